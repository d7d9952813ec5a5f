"""loraloop's shared bottom layer: the one Settings object and its slices, default paths, the error base and
exit codes, the adapter registry and run records, the cycle's status file and the quantization schemes.
It imports none of the loop's packages (feedback, serving, retrain, deploy); they all import it.
Importing it creates nothing (no threads, files or metrics)."""
