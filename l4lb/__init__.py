"""l4lb: a layer-4 load balancer with an XDP fast path."""

import os as _os

# numpy's OpenBLAS starts a worker thread per CPU that spins after BLAS calls; l4lb's
# numpy work is element-wise (no BLAS to parallelise), and on a balancer every CPU
# cycle belongs to the data plane and the VRRP/sync loops. Set before numpy loads.
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
