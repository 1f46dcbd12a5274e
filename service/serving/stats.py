"""What each policy version earned with real clients: calls, sessions, episodes and the episode
returns clients reported, and for a shadow version how often it agreed with the primary.

Counted in plain Python on the event loop (an act call adds to two integers), per process:
``GET /v1/policies/{name}/stats`` answers this process's figures, and ``/metrics`` exports them
as counters and sums (``policy_server_episode_return`` count / sum / sum of squares), which
Prometheus adds up across replicas into the same mean and std. Label values are bounded: a
version is counted only once the registry resolved it, and forgotten when it is deleted.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

# two-sided 95% Student t quantiles, df 1..30 (beyond: a series in 1/df, within 0.003)
_T95 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
_Z = 1.959964


def t95(df: int) -> float:
    if df <= len(_T95):
        return _T95[df - 1]
    return _Z + (_Z**3 + _Z) / (4 * df) + (5 * _Z**5 + 16 * _Z**3 + 3 * _Z) / (96 * df * df)


@dataclass(slots=True)
class VersionCounts:
    requests: int = 0  # act calls answered (a batch is one)
    observations: int = 0
    sessions: int = 0  # sessions created on it
    episodes: int = 0
    return_sum: float = 0.0
    return_squares: float = 0.0
    # as a shadow: observations compared with the primary's answer, and those that agreed
    compared: int = 0
    agreed: int = 0

    def returns(self) -> dict:
        n = self.episodes
        if n == 0:
            return {"mean": None, "std": None, "ci95": None}
        mean = self.return_sum / n
        if n == 1:
            return {"mean": mean, "std": None, "ci95": None}
        var = max(0.0, (self.return_squares - n * mean * mean) / (n - 1))
        std = math.sqrt(var)
        half = t95(n - 1) * std / math.sqrt(n)
        return {"mean": mean, "std": std, "ci95": [mean - half, mean + half]}


class PolicyStats:
    def __init__(self) -> None:
        self._counts: dict[tuple[str, int], VersionCounts] = {}
        self._dropped: dict[str, int] = {}  # shadow copies dropped (queue full), per policy

    def _of(self, policy: str, version: int) -> VersionCounts:
        c = self._counts.get((policy, version))
        if c is None:
            c = self._counts[(policy, version)] = VersionCounts()
        return c

    def served(self, policy: str, version: int, rows: int) -> None:
        c = self._of(policy, version)
        c.requests += 1
        c.observations += rows

    def session(self, policy: str, version: int) -> None:
        self._of(policy, version).sessions += 1

    def episode(self, policy: str, version: int, ret: float) -> None:
        c = self._of(policy, version)
        c.episodes += 1
        c.return_sum += ret
        c.return_squares += ret * ret

    def shadowed(self, policy: str, version: int, compared: int, agreed: int) -> None:
        c = self._of(policy, version)
        c.compared += compared
        c.agreed += agreed

    def dropped(self, policy: str) -> None:
        self._dropped[policy] = self._dropped.get(policy, 0) + 1

    def forget(self, policy: str, version: int | None = None) -> None:
        """A deleted version (or policy) leaves the figures and ``/metrics``."""
        for key in [k for k in self._counts if k[0] == policy and version in (None, k[1])]:
            del self._counts[key]
        if version is None:
            self._dropped.pop(policy, None)

    def report(self, policy: str, versions: list[int], shadow: int | None) -> dict:
        """``GET /v1/policies/{name}/stats``: each servable version's figures, and the shadow's."""
        out = []
        for v in versions:
            c = self._counts.get((policy, v), VersionCounts())
            out.append(
                {
                    "version": v,
                    "requests": c.requests,
                    "observations": c.observations,
                    "sessions": c.sessions,
                    "episodes": c.episodes,
                    "return": c.returns(),
                }
            )
        shadow_part = None
        if shadow is not None:
            c = self._counts.get((policy, shadow), VersionCounts())
            shadow_part = {
                "version": shadow,
                "compared": c.compared,
                "agreement": c.agreed / c.compared if c.compared else None,
                "dropped": self._dropped.get(policy, 0),
            }
        return {"policy": policy, "versions": out, "shadow": shadow_part}

    def collect(self) -> Iterator[Metric]:
        """Prometheus families (this object is registered as a collector)."""
        labels = ["policy", "version"]
        fams = {
            "requests": CounterMetricFamily(
                "policy_server_version_requests", "Act calls answered per version", labels=labels
            ),
            "sessions": CounterMetricFamily(
                "policy_server_version_sessions", "Sessions created per version", labels=labels
            ),
            "episodes": CounterMetricFamily(
                "policy_server_episodes", "Client-reported episodes per version", labels=labels
            ),
            "return_sum": GaugeMetricFamily(
                "policy_server_episode_return_sum", "Sum of client-reported episode returns", labels=labels
            ),
            "return_squares": GaugeMetricFamily(
                "policy_server_episode_return_squares",
                "Sum of squared client-reported episode returns (with count and sum: the std)",
                labels=labels,
            ),
            "compared": CounterMetricFamily(
                "policy_server_shadow_compared", "Observations a shadow version answered", labels=labels
            ),
            "agreed": CounterMetricFamily(
                "policy_server_shadow_agreed", "Shadow answers equal to the primary's", labels=labels
            ),
        }
        for (policy, version), c in list(self._counts.items()):
            for attr, fam in fams.items():
                fam.add_metric([policy, str(version)], getattr(c, attr))
        yield from fams.values()
        dropped = CounterMetricFamily(
            "policy_server_shadow_dropped", "Shadow copies dropped (queue full)", labels=["policy"]
        )
        for policy, n in list(self._dropped.items()):
            dropped.add_metric([policy], n)
        yield dropped
