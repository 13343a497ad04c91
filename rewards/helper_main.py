"""Entry point of a reward helper process (see :mod:`dare_gym.rewards.worker`); never imported otherwise."""

from dare_gym.rewards.worker import serve

if __name__ == "__main__":
    serve()
