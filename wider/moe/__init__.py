"""The MoE layer family every architecture reuses (DESIGN section 6).

wider.moe knows no architecture and no training loop: routers (router.py), index-based dispatch with
capacity and expert-parallel all-to-all (dispatch.py), stacked grouped-GEMM experts (experts.py), the
DeepSpeed-recognised layer (layer.py), the "moe" ds_config block (settings.py) and statistics (stats.py).
"""
