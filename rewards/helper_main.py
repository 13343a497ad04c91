"""Entry point of a spawned reward helper process (see :mod:`dare_gym.rewards.worker`); never imported otherwise.

    python -m dare_gym.rewards.helper_main <read fd> <write fd> <parent pid>
"""

import pickle
import sys

from dare_gym.rewards.worker import become_helper, serve

if __name__ == "__main__":
    read_fd, write_fd, parent_pid = (int(arg) for arg in sys.argv[1:4])
    become_helper(parent_pid)
    import dare_gym.rewards  # noqa: F401  (the registry and the project's rewards, before the first call)

    serve(read_fd, write_fd, pickle.loads)
