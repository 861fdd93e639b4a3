"""Equal-budget quality studies (DESIGN 11): `python -m wider.study {list,plan,run,report}`.

    python -m wider.study list                                           # the studies, their arms and scales
    python -m wider.study plan widenet --scale gpu                       # counts, matching, FLOPs, expected time
    python -m wider.study run widenet --scale cpu --jobs 2               # train every arm x seed, then the report
    python -m wider.study run granularity --scale cpu --lr-grid 1e-3,3e-3,1e-2 --jobs 2
    python -m wider.study report widenet --scale cpu                     # table and plots of what has finished

The studies are defined in wider/studies.py (next to the presets). Modules: runner (the plan: every arm x seed as a
run of the recipes, trained by the sweep's runner, wider.scaling.sweep.train_run; the learning-rate grid), report
(statistics, the Markdown table, the PNG plots). Like wider.scaling, it launches training only through the recipes'
command line and reads their run directories; it never imports the training loop.
"""
