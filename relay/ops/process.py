"""Process-wide settings a long-running relay makes at start-up.

* **Descriptors.** Every relayed stream holds two sockets (client and
  upstream), and the default soft ``RLIMIT_NOFILE`` (often 1024) caps a
  relay far below ``--max-connections``. As nginx's ``worker_rlimit_nofile``
  does, relay raises its soft limit to the hard one, and says in one line when
  even that cannot hold ``--max-connections`` streams.
* **The collector.** What start-up allocated (modules, configuration, TLS
  contexts) lives as long as the process; :func:`freeze_startup` moves it out
  of the cyclic collector's generations, so no full collection walks it again.
  relay's own objects are freed by reference counting (a test holds every
  exchange ending to that), so a full collection finds nothing of relay's,
  yet walks every object of every held stream: measured with 4000 held
  streams, 45 ms during which no token moves, every few seconds of churn.
  Full collections are therefore made ten times rarer (the third threshold,
  gen-1 collections between full ones, from 10 to 100); young collections
  stay as they are, as they are short and catch other code's cycles.
"""

from __future__ import annotations

import gc
import logging
import resource

__all__ = ["DESCRIPTORS_PER_STREAM", "SPARE_DESCRIPTORS", "freeze_startup", "raise_nofile_limit"]

log = logging.getLogger("relay.events")

#: A relayed stream holds its client socket and its upstream socket.
DESCRIPTORS_PER_STREAM = 2
#: Listeners, the admin listener, logs, health checks, idle pooled connections.
SPARE_DESCRIPTORS = 64
#: Young collections between full ones (CPython's default is 10): see the module doc.
FULL_COLLECTION_EVERY = 100
#: Where the kernel's own ceiling (``/proc/sys/fs/nr_open``) cannot be read.
_FALLBACK_CEILING = 1 << 20


def _kernel_ceiling() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as file:
            return int(file.read())
    except (OSError, ValueError):
        return _FALLBACK_CEILING


def raise_nofile_limit(max_connections: int) -> int:
    """Raise the soft descriptor limit to the hard one; the soft limit now.

    Logs one warning when ``max_connections`` streams (two descriptors each,
    plus a few spare) do not fit in it.
    """
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return 0  # nothing to raise, nothing to say
    target = hard if hard != resource.RLIM_INFINITY else _kernel_ceiling()
    if soft == resource.RLIM_INFINITY:
        target = soft
    elif soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            target = soft  # refused (a container's seccomp, say): keep what we have
    else:
        target = soft
    needed = max_connections * DESCRIPTORS_PER_STREAM + SPARE_DESCRIPTORS
    if target != resource.RLIM_INFINITY and target < needed:
        streams = max(0, (target - SPARE_DESCRIPTORS) // DESCRIPTORS_PER_STREAM)
        log.warning(
            "--max-connections %d needs about %d file descriptors (two per stream), but this "
            "process may open %d: about %d streams fit; raise the limit (LimitNOFILE=, "
            "ulimit -n) or lower --max-connections",
            max_connections,
            needed,
            target,
            streams,
        )
    return target


def freeze_startup() -> None:
    """Collect once, keep what start-up allocated out of later collections, and
    make full collections rarer."""
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)
