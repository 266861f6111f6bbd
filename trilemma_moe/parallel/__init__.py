"""Expert parallelism: process-group topology (made once), group-to-rank placement, the
two-stage all-to-all communicator, the rank-0 regroup coordinator's collectives and byte
counters (``comm``), and the communication-volume model behind ``trilemma-moe profile-comm``."""
from .topology import (ExpertParallelTopology, check_placement, check_same_config, owned_groups,  # noqa: F401
                       owner_of_group)
from .comm import ExpertParallelComm, average_gradients  # noqa: F401
