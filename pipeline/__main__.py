import gc
import sys

from pipeline.cli import main

status = main()
# Every file and lock is closed by now; the exit then frees what is left without the collector walking every
# object torch and its kin made (a cycle left now is not finalized).
gc.freeze()
sys.exit(status)
