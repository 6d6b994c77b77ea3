import os

# offline by design: every test must pass with the hub unreachable
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# one BLAS thread per process: tests and nbval kernels share 2 cores, and oversubscribed tiny matmuls are 50x slower
os.environ.setdefault("OMP_NUM_THREADS", "1")
