import gc
import sys

from pipeline.cli import main

status = main()
gc.freeze()  # the exit then frees what is left without the collector walking every object torch and its kin made
sys.exit(status)
