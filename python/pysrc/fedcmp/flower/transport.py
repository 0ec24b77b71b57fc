"""fedcmp's transport over Flower's Grid: how fedcmp's round loop (Rust)
reaches real sites. It only moves messages; sampling, deadlines, quorum,
validation of updates and aggregation stay in the round loop.

Sites are known by their stable client id (the SuperNode's node config),
never by Flower's node id, which changes when a SuperNode restarts: the
transport asks every node it does not know yet for its status (and with
it, its client id) before each round, so a restarted site is found again
under its new node id.
"""

from __future__ import annotations

import json
import logging
import time

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedcmp import WireArray
from fedcmp.flower.codec import CONFIG, from_records, to_records

log = logging.getLogger("fedcmp.flower")


class FlowerTransport:
    """The object ``fedcmp.serve`` drives (see ``fedcmp._native``)."""

    def __init__(
        self,
        grid: Grid,
        settings: str,
        *,
        min_sites: int = 1,
        wait_for_sites: float = 300.0,
        query_timeout: float = 300.0,
        round_timeout: float | None = None,
        backbones: str = "",
    ) -> None:
        self.grid = grid
        self.settings = settings
        # The server's backbone digests (``fedcmp.backbone_digests``), sent
        # with every message: a site whose files differ refuses to train.
        self.backbones = backbones
        self.min_sites = min_sites
        self.wait_for_sites = wait_for_sites
        self.query_timeout = query_timeout
        self.round_timeout = round_timeout
        self.node_of: dict[int, int] = {}
        self.round = 0

    def _query(self, node_ids: list[int], round_: int) -> list[str]:
        messages = [
            Message(
                RecordDict(
                    {CONFIG: ConfigRecord({"settings": self.settings, "round": round_, "backbones": self.backbones})}
                ),
                dst_node_id=node,
                message_type=MessageType.QUERY,
            )
            for node in node_ids
        ]
        statuses = []
        replies = list(self.grid.send_and_receive(messages, timeout=self.query_timeout))
        log.info("status query to nodes %s: %d replies", node_ids, len(replies))
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("node %s did not answer the status query: %s", node, reply.error.reason)
                continue
            status = str(reply.content.config_records[CONFIG]["status"])
            client = int(json.loads(status)["client"])
            log.info("node %s is site %s: %s", node, client, status)
            previous = self.node_of.get(client)
            if previous is not None and previous != node:
                log.info("site %s is now node %s (was node %s)", client, node, previous)
            self.node_of[client] = node
            statuses.append(status)
        return statuses

    def status(self, round_: int) -> list[str]:
        """Every site's status as of ``round_`` (JSON); waits up to
        ``wait_for_sites`` seconds for ``min_sites`` nodes to connect."""
        self.round = round_
        deadline = time.monotonic() + self.wait_for_sites
        nodes = list(self.grid.get_node_ids())
        while len(nodes) < self.min_sites and time.monotonic() < deadline:
            time.sleep(1.0)
            nodes = list(self.grid.get_node_ids())
        if len(nodes) < self.min_sites:
            log.warning("%d of %d sites connected; going on with those", len(nodes), self.min_sites)
        return self._query(nodes, round_)

    def _await_any(self, clients: list[int], round_: int) -> tuple[set[int], list[str]]:
        """Waits up to ``wait_for_sites`` seconds for one of ``clients`` to
        be connected (a restarted SuperNode is refused by Flower for up to a
        minute after a crash): without this, a round whose every site is
        away would fail at once, and the next ones too, until the sites are
        retired and the run ends with their data unused. Returns the live
        nodes and the statuses of sites found meanwhile."""
        log.info(
            "round %s: none of sites %s is connected; waiting up to %.0f s for one to come back",
            round_,
            clients,
            self.wait_for_sites,
        )
        deadline = time.monotonic() + self.wait_for_sites
        found: list[str] = []
        live = set(self.grid.get_node_ids())
        while time.monotonic() < deadline:
            time.sleep(1.0)
            live = set(self.grid.get_node_ids())
            unknown = sorted(live - set(self.node_of.values()))
            if unknown:
                found += self._query(unknown, max(round_ - 1, 0))
            if any(self.node_of.get(client) in live for client in clients):
                log.info("round %s: a site is back after waiting", round_)
                break
        return live, found

    def run_round(
        self, tasks: list[tuple[int, str, list[WireArray]]], timeout: float | None
    ) -> tuple[list[tuple[int, str, list[WireArray]]], list[tuple[int, str, str]], list[str]]:
        """Sends each task to its site; returns the replies, the failures
        (no such site connected, an error there, no reply in time) and the
        statuses of sites found since the last round (joined or restarted)."""
        round_ = int(json.loads(tasks[0][1])["round"]) if tasks else self.round
        live = set(self.grid.get_node_ids())
        unknown = sorted(live - set(self.node_of.values()))
        joined = self._query(unknown, max(round_ - 1, 0)) if unknown else []
        if tasks and not any(self.node_of.get(client) in live for client, _, _ in tasks):
            live, found = self._await_any([client for client, _, _ in tasks], round_)
            joined += found
        failures: list[tuple[int, str, str]] = []
        messages = []
        sent: list[tuple[Message, int]] = []
        for client, header, arrays in tasks:
            node = self.node_of.get(client)
            if node is None or node not in live:
                log.warning("site %s (node %s) is not among the connected nodes %s", client, node, sorted(live))
                failures.append((client, "error", "no site with this client id is connected"))
                continue
            message = Message(
                to_records({"settings": self.settings, "header": header, "backbones": self.backbones}, arrays),
                dst_node_id=node,
                message_type=MessageType.TRAIN,
                group_id=str(round_),
            )
            messages.append(message)
            sent.append((message, client))
        wait = timeout if timeout is not None else self.round_timeout
        received = list(self.grid.send_and_receive(messages, timeout=wait)) if messages else []
        # Pushing gave each message its id; replies name it (an error reply
        # made by the SuperLink for a lost node carries no usable node id).
        client_of = {m.metadata.message_id: client for m, client in sent}
        replies: list[tuple[int, str, list[WireArray]]] = []
        answered: set[int] = set()
        for reply in received:
            client = client_of.get(reply.metadata.reply_to_message_id)
            if client is None or client in answered:
                log.warning("a reply to no task of round %s; ignored", round_)
                continue
            answered.add(client)
            if reply.has_error():
                failures.append((client, "error", str(reply.error.reason)))
                continue
            try:
                config, arrays = from_records(reply.content)
                replies.append((client, str(config["header"]), arrays))
            except Exception as e:  # a malformed reply costs its own update only
                failures.append((client, "error", f"unreadable reply: {e}"))
        for _, client in sent:
            if client not in answered:
                failures.append((client, "timeout", "no reply before the round closed"))
        return replies, failures, joined
