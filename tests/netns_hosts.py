"""Test hosts with their own addresses on one machine: Linux network namespaces joined by veth
links (`ip netns`, `ip link`), made by the tests and removed afterwards.

* 2 hosts: one veth pair, host i is ``10.77.0.<i+1>/24`` on interface ``<tag>h<i>``;
* 3 or more: every host's veth ends in a bridge inside an extra namespace (a switch).

Every host has its loopback up and nothing else: processes started with ``hosts.cmd(i, ...)``
(``ip netns exec``) see only that host's interfaces, reach the others over the virtual link, and
read that link's counters in ``/sys/class/net/<if>/statistics``. Names are unique per test run
(pid + counter), so parallel runs do not collide. Needs root (``ip netns add``); ``available()``
says why not otherwise, for a clean skip.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from typing import Dict, List, Optional, Sequence

SUBNET = "10.77.0"
_counter = itertools.count()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def available() -> Optional[str]:
    """None if namespaces can be made here, else the reason (for pytest.skip)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root (ip netns add); run the tests as root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"tmprobe{os.getpid()}"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"`ip netns add` fails here: {r.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


class NetnsHosts:
    """``n`` hosts, ``address(i)``, ``ifname(i)``, ``cmd(i, argv)``; ``close()`` kills what runs
    in them and deletes them (also on a failed set-up)."""

    def __init__(self, n: int = 2, mtu: int = 1500):
        if n < 2:
            raise ValueError("NetnsHosts needs at least 2 hosts")
        self.n, self.mtu = n, mtu
        tag = f"tm{os.getpid() % 100000}{next(_counter)}"
        self.tag = tag
        self.namespaces = [f"{tag}-h{i}" for i in range(n)]
        self.switch = f"{tag}-sw" if n > 2 else None
        self._made: List[str] = []
        try:
            self._build()
        except Exception:
            self.close()
            raise

    # --- set-up ------------------------------------------------------------------------------
    def _add_ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)
        _ip("-n", name, "link", "set", "lo", "up")
        # IPv4 only: no IPv6 router solicitations or MLD reports among the measured packets
        subprocess.run(["ip", "netns", "exec", name, "sh", "-c",
                        "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6; "
                        "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6"], capture_output=True)

    def _build(self) -> None:
        for ns in self.namespaces:
            self._add_ns(ns)
        if self.switch is None:
            a, b = self.ifname(0), self.ifname(1)
            _ip("link", "add", a, "netns", self.namespaces[0], "mtu", str(self.mtu),
                "type", "veth", "peer", "name", b, "netns", self.namespaces[1], "mtu", str(self.mtu))
        else:
            self._add_ns(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for i, ns in enumerate(self.namespaces):
                port = f"{self.tag}p{i}"
                _ip("link", "add", self.ifname(i), "netns", ns, "mtu", str(self.mtu),
                    "type", "veth", "peer", "name", port, "netns", self.switch, "mtu", str(self.mtu))
                _ip("-n", self.switch, "link", "set", port, "master", "br0")
                _ip("-n", self.switch, "link", "set", port, "up")
        for i, ns in enumerate(self.namespaces):
            _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", self.ifname(i))
            _ip("-n", ns, "link", "set", self.ifname(i), "up")
        # the link is usable once host 0 answers host 1 (veth carrier comes up at once; DAD off on IPv4)
        for _ in range(50):
            if subprocess.run(["ip", "netns", "exec", self.namespaces[1], "ping", "-c", "1", "-W", "1",
                               self.address(0)], capture_output=True).returncode == 0 \
                    or shutil.which("ping") is None:
                break
            time.sleep(0.1)

    # --- addressing ----------------------------------------------------------------------------
    def address(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def ifname(self, i: int) -> str:
        return f"{self.tag}h{i}"

    def cmd(self, i: int, argv: Sequence[str]) -> List[str]:
        """``argv`` run on host i (its network namespace; environment and files are shared)."""
        return ["ip", "netns", "exec", self.namespaces[i], *argv]

    def env(self, i: int, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        """Environment for a torch.distributed (gloo) process on host i: gloo binds host i's
        veth, not whatever the machine's hostname resolves to (absent in the namespace)."""
        return dict(base if base is not None else os.environ, GLOO_SOCKET_IFNAME=self.ifname(i))

    # --- the link --------------------------------------------------------------------------
    def link_stats(self, i: int) -> Dict[str, int]:
        """Counters of host i's veth (bytes and packets, both directions) as the kernel keeps them."""
        out = _ip("-n", self.namespaces[i], "-s", "-j", "link", "show", "dev", self.ifname(i)).stdout
        s = json.loads(out)[0]["stats64"]
        return {"rx_bytes": s["rx"]["bytes"], "rx_packets": s["rx"]["packets"],
                "tx_bytes": s["tx"]["bytes"], "tx_packets": s["tx"]["packets"]}

    def set_link(self, i: int, up: bool) -> None:
        """Cut (or restore) host i's link: its veth goes down, the peer loses carrier; no process
        is told, TCP connections just stop delivering."""
        _ip("-n", self.namespaces[i], "link", "set", self.ifname(i), "up" if up else "down")

    def shape(self, i: int, rate: Optional[str] = "1gbit", delay: Optional[str] = None,
              burst: str = "256kb", latency: str = "50ms") -> str:
        """Limit host i's egress: ``rate`` with tbf (a token bucket), plus a one-way ``delay`` with
        netem where the kernel has it (``sch_netem``; this machine kind's kernel does not: tbf and
        htb are built in, netem is not). Returns the qdisc set up, as ``tc qdisc show`` prints it."""
        ns, dev = self.namespaces[i], self.ifname(i)
        if delay:
            args = ["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "netem", "delay", delay]
            if rate:
                args += ["rate", rate]
            r = subprocess.run(args, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"tc netem (delay {delay}) is not available here: {r.stderr.strip()} "
                                   f"(this kernel has no sch_netem; limit the rate alone with delay=None)")
        elif rate:
            subprocess.run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
                            "burst", burst, "latency", latency], check=True, capture_output=True, text=True)
        return subprocess.run(["tc", "-n", ns, "qdisc", "show", "dev", dev], capture_output=True, text=True,
                              check=True).stdout.strip()

    def pids(self, i: int) -> List[int]:
        r = _ip("netns", "pids", self.namespaces[i], check=False)
        return [int(p) for p in r.stdout.split()]

    def kill_all(self, i: int, sig: int = signal.SIGKILL) -> List[int]:
        """Kill every process running on host i (those the tests started there), by pid."""
        pids = self.pids(i)
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        return pids

    # --- tear-down -------------------------------------------------------------------------
    def close(self) -> None:
        for ns in self._made:
            if ns in self.namespaces:
                self.kill_all(self.namespaces.index(ns))
        for ns in reversed(self._made):
            _ip("netns", "del", ns, check=False)
        self._made = []

    def __enter__(self) -> "NetnsHosts":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
