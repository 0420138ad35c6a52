"""The evaluation protocols a run can follow (``medbench run --protocol``).

``finetune``
    BiT-HyperRule fine-tuning of the whole network (or of its unfrozen part with ``--freeze``): the
    protocol of M21/CJ21/RZ19 and medbench's default.
``linear``
    a linear probe: L2-regularised logistic regression on the frozen network's features
    (:mod:`medbench.probe.linear`).
``knn``
    cosine k-nearest neighbours on the frozen network's features with a temperature-weighted vote
    (:mod:`medbench.probe.knn`).

In a :class:`~medbench.run.request.RunRequest` the fine-tuning protocol is spelled ``None``: a field left at
None stays out of the run key, so runs made before protocols existed keep their keys.
"""

from __future__ import annotations

from typing import Iterable, get_args

from medbench.errors import UsageError
from medbench.spec.model import Protocol
from medbench.utils import did_you_mean

#: the protocol names, written once (``medbench.spec.model.Protocol``, which task and suite YAML accept)
PROTOCOLS: tuple[str, ...] = get_args(Protocol)
FINETUNE = PROTOCOLS[0]
PROBES = PROTOCOLS[1:]


def parse_protocols(values: str | Iterable[str] | None, *, field: str = "--protocol") -> list[str]:
    """``"finetune,linear"`` or ``["linear", "knn"]`` -> the protocols in order, without repeats; [] for None."""
    if values is None:
        return []
    items = [values] if isinstance(values, str) else list(values)
    out: list[str] = []
    for item in items:
        for name in str(item).replace(" ", "").split(","):
            if not name:
                continue
            if name not in PROTOCOLS:
                raise UsageError(f"unknown protocol {name!r}{did_you_mean(name, list(PROTOCOLS))}; expected one of "
                                 f"{', '.join(PROTOCOLS)}", field=field)
            out.append(name)
    if items and not out:
        raise UsageError(f"expected at least one of {', '.join(PROTOCOLS)}", field=field)
    return list(dict.fromkeys(out))


def request_protocol(name: str | None) -> str | None:
    """The protocol as a run request holds it: None for fine-tuning, else the probe's name."""
    if name in (None, FINETUNE):
        return None
    if name not in PROBES:
        raise UsageError(f"unknown protocol {name!r}; expected one of {', '.join(PROTOCOLS)}", field="--protocol")
    return name


def protocol_name(value: str | None) -> str:
    """The protocol of a run request, result or leaderboard entry (None or absent: ``finetune``)."""
    return value or FINETUNE


def is_probe(value: str | None) -> bool:
    return protocol_name(value) in PROBES
