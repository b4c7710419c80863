"""What a reload changes: a pure plan from the forwards tunneld has and the ones the new
config declares.  No I/O; the forwards service applies it (``Forwards.reload``).

Forwards of origin "config" that the new config still declares keep their listeners and open
connections; the ones it no longer declares are removed; new ones are bound.  Forwards of
origin "added" and "auto" are left alone.  A new forward that collides with a forward tunneld
already has (another target on the same address) makes the whole reload fail (BindError): the
running config stays.  A new forward on the address of a removed one can only be bound after
that removal (``after``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import BindError
from .spec import ForwardSpec

#: where a forward listens: ("here", bind host, port), or (host, "remote", bind host, port)
Where = tuple[str, ...]
#: a forward of a host
HostSpec = tuple[str, ForwardSpec]


def where(host: str, s: ForwardSpec) -> Where:
    """The listening address ``s`` takes: on this machine, or on ``host``'s server."""
    if s.kind == "remote":
        return (host, "remote", s.bind_host, str(s.bind_port))
    return ("here", s.bind_host, str(s.bind_port))


@dataclass(frozen=True)
class Listener:
    """A forward tunneld has: its host, spec and origin."""

    host: str
    spec: ForwardSpec
    origin: str


@dataclass
class ReloadPlan:
    #: new forwards to bind before anything is removed (all or nothing)
    first: list[HostSpec] = field(default_factory=list)
    #: forwards of the old config to remove
    gone: list[HostSpec] = field(default_factory=list)
    #: new forwards on the address of a removed one: bound after the removals
    after: list[HostSpec] = field(default_factory=list)
    #: forwards of the old config the new one declares too (left as they are)
    kept: int = 0
    #: new forwards that `tunnelctl add` made already ("HOST SPEC"): left as they are
    existing: list[str] = field(default_factory=list)
    #: forwards declared twice in the new config: the first one counts
    duplicates: list[HostSpec] = field(default_factory=list)


def plan_reload(have: list[Listener], wanted: dict[str, list[ForwardSpec]]) -> ReloadPlan:
    """The changes from ``have`` to the config forwards ``wanted`` (host → specs).  Raises
    BindError for a wanted forward that collides with one tunneld has."""
    plan = ReloadPlan()
    current = {(x.host, x.spec) for x in have if x.origin == "config"}
    by_where = {where(x.host, x.spec): x for x in have}
    wanted_list: list[HostSpec] = []
    seen: set[Where] = set()
    for host, specs in wanted.items():
        for s in specs:
            key = where(host, s)
            if key in seen:   # declared twice: the first one wins, as at start
                plan.duplicates.append((host, s))
                continue
            seen.add(key)
            wanted_list.append((host, s))
    keep = set(wanted_list)
    plan.gone = [(h, s) for h, s in sorted(current, key=lambda x: (x[0], x[1]))
                 if (h, s) not in keep]
    freed = {where(h, s) for h, s in plan.gone}
    for host, s in wanted_list:
        if (host, s) in current:
            plan.kept += 1
            continue
        key = where(host, s)
        if key in freed:
            plan.after.append((host, s))
            continue
        other = by_where.get(key)
        if other is not None:
            if other.host == host and other.spec == s:
                plan.existing.append(f"{host} {s}")   # added at run time: leave it as is
                continue
            raise BindError(
                f"config not applied (the running one stays): {host} {s} cannot listen on "
                f"{s.listen}: tunneld already forwards it to {other.host} "
                f"{other.spec.target}; remove that first (`tunnelctl remove {other.host} "
                f"{other.spec}`) or change the config")
        plan.first.append((host, s))
    return plan
