"""The command-line tools users call on trained models: export, evaluate, generate.

Each module holds its parser and `main(argv) -> exit status`; recipes/<name>.py runs it as a script, and the
installed package provides the same as console commands (wider-export, wider-evaluate, wider-generate). Exit
status 0 done, 2 invalid input (with one message naming the value and the fix), 1 failure.
"""
