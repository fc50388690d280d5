"""Where jobs run: in this process, or as Ray tasks on a local Ray or the cluster RAY_ADDRESS names."""

from __future__ import annotations

from typing import Callable, Iterator

from ...errors import UserError, require


class LocalExecutor:
    name = "local"

    def map(self, fn: Callable, jobs: list) -> Iterator[tuple[object, dict]]:
        for job in jobs:
            yield job, fn(job)

    def close(self) -> None:
        pass


class RayExecutor:
    """Jobs as Ray tasks, each asking for `threads` CPUs (so a node runs
    CPUs / threads jobs at once). Connects to the cluster RAY_ADDRESS names,
    else starts a local Ray with `num_cpus` CPUs (default: all)."""

    name = "ray"

    def __init__(self, threads: int, num_cpus: int | None = None):
        import logging
        import os

        try:
            import ray
        except ImportError as e:
            raise UserError("--ray needs Ray: pip install 'multiconcept[ray]' (or drop --ray to run locally)") from e
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            address = os.environ.get("RAY_ADDRESS")
            kwargs = {} if address else {"num_cpus": max(num_cpus or os.cpu_count() or 1, threads)}
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                         configure_logging=False, **kwargs)
            except (ConnectionError, RuntimeError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UserError(f"could not start or reach Ray (RAY_ADDRESS={address or 'unset'}): {first}: "
                                f"check the address, or unset RAY_ADDRESS for a local Ray") from e
        cpus = ray.cluster_resources().get("CPU", 0)
        require(cpus >= threads, f"the Ray cluster has {cpus:g} CPUs, fewer than --threads {threads}: lower --threads")
        self.threads = threads

    def map(self, fn: Callable, jobs: list) -> Iterator[tuple[object, dict]]:
        ray = self.ray
        remote = ray.remote(num_cpus=self.threads, max_retries=0)(fn)
        pending = {remote.remote(job): job for job in jobs}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayTaskError as e:
                for ref in pending:
                    ray.cancel(ref)
                cause = getattr(e, "cause", None)
                if isinstance(cause, UserError):
                    raise UserError(str(cause)) from e
                raise
            yield job, result

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def make_executor(use_ray: bool, threads: int, ray_cpus: int | None = None):
    return RayExecutor(threads, ray_cpus) if use_ray else LocalExecutor()
