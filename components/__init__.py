"""KFP v2 components: each moves typed artifacts in and out of one ``grace.workflow.steps`` call.

Every component runs in the project's image (``Dockerfile``), which has ``grace`` and kfp
installed, so no package is installed at run time (``install_kfp_package=False``).
"""

import os

GRACE_IMAGE = os.environ.get("GRACE_IMAGE", "ghcr.io/grace-retrieval/grace:0.1.0")
