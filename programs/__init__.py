"""Entry points: `python -m programs.<name> --config x.yaml`.

OpenMP threads that spin-wait collapse when the cores are shared: measured here, one LoRA
forward+backward of SmolLM2-135M took 76 s with 2 spinning threads while another process ran, 6 s
with passive waiting. So the programs wait passively unless the user chose a policy; this must be
set before torch starts its thread pool, hence here.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
