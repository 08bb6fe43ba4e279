"""What the Databricks API says about the endpoint or instance: its hosts and its state.

Sans-I/O: :func:`parse_endpoint` and :func:`parse_instance` turn the JSON
object of ``GET /api/2.0/postgres/{ENDPOINT_NAME}`` (autoscaling) or ``GET
/api/2.0/database/instances/{name}`` (provisioned) into a
:class:`TargetStatus`; :meth:`TargetStatus.verdict` says what a dial should do
in that state. :mod:`lakeproxy.auth.databricks` makes the requests.

Field names, from Databricks' API reference:

* autoscaling Endpoint: ``status.hosts`` (``EndpointHosts``: ``host``,
  ``read_only_host``, ``read_write_pooled_host``, ``read_only_pooled_host``),
  ``status.current_state`` (``ACTIVE``, ``IDLE``, ``INIT``, ``DEGRADED``),
  ``spec.disabled`` and ``status.disabled``. The reference shows ``spec`` as
  "input only", so a GET may carry ``disabled`` only in ``status``: both are
  read, either one being true counts.
* provisioned DatabaseInstance: ``read_write_dns``, ``read_only_dns`` (set when
  readable secondaries are enabled), ``state`` (``AVAILABLE``, ``STARTING``,
  ``STOPPED``, ``UPDATING``, ``FAILING_OVER``, ``DELETING``) and
  ``effective_stopped``.

Unclear in the docs, and decided here:

* The pooled host fields: the SDK reference for ``EndpointHosts`` lists
  ``host`` and ``read_only_host`` and describes "r/w or r/o, pooled or not"
  without naming the pooled fields; the names above are the ones the issue
  and SPEC use. A host that is absent is reported as such, never guessed.
* ``UPGRADING`` is not in the SDK's ``DatabaseInstance_State`` list; it is
  treated like ``UPDATING`` (retried) in case the API reports it.
* An unknown or missing state is dialed: lakeproxy never refuses a client
  because of a state it does not know.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

from lakeproxy.config.model import HOST_KINDS, HostKind

#: The JSON field holding each kind's host name.
ENDPOINT_FIELDS: Final[Mapping[HostKind, str]] = {
    "read_write": "host",
    "read_only": "read_only_host",
    "pooled": "read_write_pooled_host",
    "read_only_pooled": "read_only_pooled_host",
}
INSTANCE_FIELDS: Final[Mapping[HostKind, str]] = {
    "read_write": "read_write_dns",
    "read_only": "read_only_dns",
}

#: What a dial does in a state: go ahead, go ahead but expect "not yet"
#: answers (retried within the deadline), or fail the client at once.
Verdict = Literal["dial", "wait", "refuse"]

#: Provisioned states in which the instance is on its way to AVAILABLE.
INSTANCE_TRANSITIONS: Final = frozenset({"STARTING", "UPDATING", "UPGRADING", "FAILING_OVER"})
#: Provisioned states no wait can fix.
INSTANCE_REFUSED: Final = frozenset({"STOPPED", "DELETING"})

HINT_DISABLED: Final = (
    "the endpoint is disabled (spec.disabled): enable it in the Lakebase UI or with "
    "the API (update the endpoint with spec.disabled=false), then reconnect"
)
HINT_STOPPED: Final = (
    "start the instance in the Lakebase UI or with the API (update the instance with "
    "stopped=false), then reconnect"
)
HINT_DELETING: Final = "the instance is being deleted: point LAKEBASE_INSTANCE at another one"


class StatusError(ValueError):
    """The API's object is not what the reference describes (no ``status``, ...)."""


@dataclass(frozen=True, slots=True)
class TargetStatus:
    """The hosts and state of one endpoint or instance, as last read.

    ``hosts`` holds the kinds the object reports, in :data:`HOST_KINDS`
    order; ``state`` is ``current_state`` (autoscaling) or ``state``
    (provisioned), ``"UNKNOWN"`` when absent.
    """

    provisioned: bool
    state: str
    disabled: bool
    hosts: tuple[tuple[HostKind, str], ...]

    def host(self, kind: HostKind) -> str | None:
        """The host name for ``kind``, or None when the object reports none."""
        for k, name in self.hosts:
            if k == kind:
                return name
        return None

    def field(self, kind: HostKind) -> str:
        """The JSON field that holds ``kind``'s host (for messages)."""
        fields = INSTANCE_FIELDS if self.provisioned else ENDPOINT_FIELDS
        return fields.get(kind, kind)

    @property
    def what(self) -> str:
        return "instance" if self.provisioned else "endpoint"

    def verdict(self) -> Verdict:
        """``refuse`` for a disabled endpoint or a STOPPED/DELETING instance;
        ``wait`` while an instance is starting, updating or failing over;
        else ``dial`` (IDLE and INIT are woken by the connection itself)."""
        if self.disabled:
            return "refuse"
        if self.provisioned:
            if self.state in INSTANCE_REFUSED:
                return "refuse"
            if self.state in INSTANCE_TRANSITIONS:
                return "wait"
        return "dial"

    def describe(self) -> str:
        """``IDLE``, ``ACTIVE (disabled)``, ``STOPPED``: for logs and ``check``."""
        return f"{self.state} (disabled)" if self.disabled else self.state

    def refusal(self) -> tuple[str, str]:
        """(message, hint) for a refused state; only meaningful when verdict() is refuse."""
        if self.disabled:
            return "the endpoint is disabled", HINT_DISABLED
        if self.state == "DELETING":
            return "the instance is being deleted (state DELETING)", HINT_DELETING
        return f"the instance is stopped (state {self.state})", HINT_STOPPED

    def missing(self, kind: HostKind) -> tuple[str, str]:
        """(message, hint) for a kind the object does not report."""
        name = self.field(kind)
        message = f"the {self.what} reports no {name}"
        if kind in ("read_only", "read_only_pooled"):
            where = ("enable readable secondaries on the instance" if self.provisioned else
                     "give the endpoint more than one compute with readable secondaries "
                     "enabled, or connect to a read-only endpoint")
            hint = (f"{message}: it has no readable secondary; {where}, or set "
                    "LAKEBASE_HOST_KIND=read_write")
        else:
            hint = f"{message}; set LAKEBASE_HOST_KIND=read_write or set the host explicitly"
        return message, hint


def parse_endpoint(obj: Mapping[str, object]) -> TargetStatus:
    """The status of an autoscaling Endpoint object. Raises StatusError."""
    status = obj.get("status")
    if not isinstance(status, dict):
        raise StatusError("no 'status' object")
    raw_hosts = status.get("hosts")
    if not isinstance(raw_hosts, dict):
        raise StatusError("no 'status.hosts' object")
    hosts = _hosts(raw_hosts, ENDPOINT_FIELDS)
    spec = obj.get("spec")
    disabled = (isinstance(spec, dict) and spec.get("disabled") is True) or (
        status.get("disabled") is True)
    return TargetStatus(provisioned=False, state=_state(status.get("current_state")),
                        disabled=disabled, hosts=hosts)


def parse_instance(obj: Mapping[str, object]) -> TargetStatus:
    """The status of a provisioned DatabaseInstance object. Raises StatusError."""
    if not isinstance(obj.get("name"), str):
        raise StatusError("no 'name' string")
    state = _state(obj.get("state"))
    if state == "UNKNOWN" and obj.get("effective_stopped") is True:
        state = "STOPPED"
    return TargetStatus(provisioned=True, state=state, disabled=False,
                        hosts=_hosts(obj, INSTANCE_FIELDS))


def _hosts(obj: Mapping[str, object], fields: Mapping[HostKind, str]
           ) -> tuple[tuple[HostKind, str], ...]:
    out: list[tuple[HostKind, str]] = []
    for kind in HOST_KINDS:
        name = fields.get(kind)
        value = obj.get(name) if name is not None else None
        if isinstance(value, str) and value.strip():
            out.append((kind, value.strip()))
    return tuple(out)


def _state(value: object) -> str:
    if isinstance(value, str) and value.strip() and value != "STATE_UNSPECIFIED":
        return value.strip().upper()
    return "UNKNOWN"
