"""Partition scope scaling out and in while records flow (scale-out design 13.1).

Members of one consumer group (cooperative-sticky, dynamic members) train one model per
input partition and hand a partition's state over through the shared checkpoint store
when it moves. A topic of 6 partitions, a counting producer writing throughout, member
processes joining and leaving for 5 rounds: a graceful leave (SIGTERM), kill -9 at the
crash points of a hand-over (``in_revoke``, ``mid_handover``) on a member that gives a
partition up when another joins, kill -9 at a random moment (seeded; the seed is printed
and ``STREAM_TRAINER_TEST_SEED`` replays it) and at ``after_checkpoint``. Then the
producer stops, one more member joins and the group drains the topic, and everything
stops gracefully.

Two oracles that do not read the service's bookkeeping:

- the **counting learner**'s multisets read from every slot's head in the store: lost 0,
  twice 0, and no record of another partition in a slot;
- **no commit for an unowned partition**: each member's log replayed in order
  (tests/faults/ownership.py); every partition in an ``offsets committed`` line is owned
  by that member at that line, per its own assigned / revoked / lost lines.

Apache Kafka for the full rounds (the classic protocol's cooperative rebalances are the
subject). SeaweedFS as the store; a short variant on a folder the members share, run on
Tansu too (its rebalances take ~10 s: the short rounds only).
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from stream_trainer.config import ObjectStoreSettings
from stream_trainer.laptop.embedded import free_port
from stream_trainer.operations.faults import CRASH_ENV
from stream_trainer.state.objectstore import open_store
from stream_trainer.state.slot_store import SlotStore
from stream_trainer.testing.counting import (
    FEATURES,
    ORACLE_MEMBER,
    RIVER_PATH,
    SKLEARN_PATH,
    CountingProducer,
    Sample,
    combined_counts,
    judge_counts,
    produced_samples,
    read_slots,
    slot_ids,
)
from stream_trainer.testing.seaweedfs import SeaweedFS
from stream_trainer.training.learners import TESTING_ENV
from tests.conftest import BrokerHandle
from tests.faults.ownership import MemberLog
from tests.faults.support import (
    LEARNT,
    committed_offsets,
    fault_config,
    topic_of,
    trickle,
    wait_exit,
)
from tests.harness import HMAC_KEY, ServiceProcess, deep_merge, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.integration]

PARTITIONS = 6
SEED_ENV = "STREAM_TRAINER_TEST_SEED"
KEY = HMAC_KEY.encode()
LEARNERS = {"per_record": RIVER_PATH, "mini_batch": SKLEARN_PATH}
# A member that crashed or was killed holds its partitions until its session expires (6 s,
# the broker's minimum); then a rebalance and the new owners' restores.
SETTLE_S = 60.0

BASE: dict[str, Any] = {
    "record": {"features": list(FEATURES), "labels": None},
    "model": {"task": "regression", "preprocessing": [], "scope": "partition"},
    "topics": {"control": None},
    "checkpoint": {"every_seconds": 0.5, "every_records": 1000, "keep_last": 3},
    "training": {"mini_batch": {"size": 200, "max_wait_s": 0.5}},
    "kafka": {"session_timeout_ms": 6000, "heartbeat_interval_ms": 500},
}

# Key scope: a model per key, room for 10 per member (50 keys: evictions and reloads);
# superseded key objects collected every second, through the kills and hand-overs.
KEY_SCOPE: dict[str, Any] = {
    "model": {"scope": "key", "key": {"max_live_models": 10, "collect_interval_s": 1}}
}


@dataclass
class Member:
    """One ``stream-trainer run`` process: one dynamic member of the group.

    ``leaving`` says how it is expected to end ("sigterm", "crash", "kill"); a member that
    exits while it is None fails the test."""

    name: str
    service: ServiceProcess
    log: MemberLog
    crash: str | None = None
    leaving: str | None = None

    @property
    def alive(self) -> bool:
        return self.service.alive()

    def owned(self) -> set[str]:
        return self.log.refresh().owned


class Group:
    """The member processes of one group, started on ``config`` with ``env``."""

    def __init__(self, config: dict[str, Any], tmp_path: Path, env: Mapping[str, str]) -> None:
        self.config, self.tmp_path, self.env = config, tmp_path, dict(env)
        self.members: list[Member] = []
        self.partitions = {f"{topic_of(config)}:{p}" for p in range(PARTITIONS)}
        self.kills = 0
        self.events: list[str] = []

    def start(self, crash: str | None = None) -> Member:
        """A new member; ``crash`` (``point:n``) arms a crash point in it."""
        name = f"m{len(self.members) + 1}"
        config = deep_merge(self.config, {"http": {"port": free_port()}})
        env = {**self.env, **({CRASH_ENV: crash} if crash else {})}
        service = ServiceProcess(config, self.tmp_path, env=env, name=name).start()
        member = Member(name, service, MemberLog(name, service.log_path), crash)
        self.members.append(member)
        self.events.append(f"{name} joins" + (f" (armed {crash})" if crash else ""))
        return member

    def alive(self) -> list[Member]:
        return [m for m in self.members if m.alive]

    def check(self) -> None:
        """Fail at once when a member exited that was not expected to."""
        for member in self.members:
            if not member.alive and member.leaving is None:
                code = member.service.proc and member.service.proc.returncode
                raise AssertionError(
                    f"{member.name} exited ({code}) unexpectedly:\n{member.service.tail(60)}"
                )

    def settled(self) -> bool:
        """Every live member owns at least one partition and each partition exactly one
        owner (per the members' own logs); the members expected to leave have left."""
        self.check()
        if any(m.alive and m.leaving is not None for m in self.members):
            return False
        owned = [m.owned() for m in self.alive()]
        return all(owned) and sum(map(len, owned)) == len(self.partitions) == len(
            set().union(*owned)
        )

    def wait_settled(self, what: str, timeout: float = SETTLE_S, learning: bool = True) -> None:
        """Until settled, then (``learning``: records still flow) until every live member
        learnt more records than when it settled (its restored slots train on)."""
        try:
            wait_for(self.settled, timeout, f"the group to settle after {what}")
        except AssertionError as error:
            tails = "\n".join(f"--- {m.name}\n{m.service.tail(15)}" for m in self.alive())
            raise AssertionError(f"{error}; owned now: {self.ownership()}\n{tails}") from None
        if not learning:
            return
        before = {m.name: m.service.metric(LEARNT, 0.0) for m in self.alive()}

        def progressed() -> bool:
            self.check()
            return all(m.service.metric(LEARNT, 0.0) > before[m.name] for m in self.alive())

        wait_for(progressed, 30.0, f"every member to learn on after {what}", interval=0.2)

    def ownership(self) -> str:
        return ", ".join(f"{m.name}: {sorted(m.owned())}" for m in self.alive())

    def sigterm(self, member: Member) -> None:
        """A graceful leave: its revoke checkpoints and commits, then LeaveGroup."""
        member.leaving = "sigterm"
        self.events.append(f"{member.name} stopped (SIGTERM)")
        code = member.service.stop()
        assert code == 0, f"{member.name} exited {code}:\n{member.service.tail(60)}"

    def kill(self, member: Member) -> None:
        member.leaving = "kill"
        self.events.append(f"{member.name} killed (kill -9)")
        assert member.service.kill() == -9
        self.kills += 1

    def expect_crash(self, member: Member, why: str) -> None:
        """``member`` must die by its armed crash point within the bound."""
        member.leaving = "crash"
        code = wait_exit(member.service, SETTLE_S, f"{member.name} to crash at {member.crash}")
        assert code == -9, (
            f"{member.name} exited {code}, not at {member.crash}:\n{member.service.tail(60)}"
        )
        self.events.append(f"{member.name} crashed at {member.crash} ({why})")
        self.kills += 1

    def stop_all(self) -> None:
        """SIGTERM to every live member at once, then each must exit 0."""
        alive = self.alive()
        for member in alive:
            member.leaving = "sigterm"
            assert member.service.proc is not None
            member.service.proc.terminate()
        for member in alive:
            code = wait_exit(member.service, 60, f"{member.name} to stop")
            assert code == 0, f"{member.name} exited {code}:\n{member.service.tail(60)}"

    def close(self) -> None:
        for member in self.members:
            member.service.__exit__()


def slot_offsets(config: Mapping[str, Any]) -> dict[str, int]:
    """Every slot's MANIFEST offset (read-only; a MANIFEST's own partition only)."""
    store = open_store(str(config["checkpoint"]["dir"]), store_settings(config))
    offsets: dict[str, int] = {}
    for scope_id in slot_ids(store):
        slot = SlotStore(store, "partition", scope_id, ORACLE_MEMBER, KEY, False, 1)
        manifest = slot.read().manifest
        if manifest is not None:
            offsets.update(manifest.offsets)
    return offsets


def key_objects_left(config: Mapping[str, Any]) -> int:
    """How many evicted key states the store holds (key scope's ``key/``)."""
    store = open_store(str(config["checkpoint"]["dir"]), store_settings(config))
    return len(store.list("key/"))


def store_settings(config: Mapping[str, Any]) -> ObjectStoreSettings:
    return ObjectStoreSettings(**config.get("object_store", {}))


def drained(group: Group, ends: Mapping[str, int]) -> Callable[[], bool]:
    """Every slot's MANIFEST and the group's committed offsets at the high watermarks."""
    config = group.config
    keys = [(topic_of(config), p) for p in range(PARTITIONS)]

    def done() -> bool:
        group.check()
        if any(slot_offsets(config).get(k, 0) < end for k, end in ends.items()):
            return False
        committed = committed_offsets(
            config["kafka"]["bootstrap_servers"], config["kafka"]["group_id"], keys
        )
        return all(committed[(t, p)] >= ends[f"{t}:{p}"] for t, p in keys)

    return done


def scale_out_config(
    tmp_path: Path, broker: BrokerHandle, mode: str, *store: Mapping[str, Any]
) -> dict[str, Any]:
    learner = {"model": {"learner": {"path": LEARNERS[mode]}}, "training": {"mode": mode}}
    return fault_config(tmp_path, broker, PARTITIONS, BASE, learner, *store)


def seed_of(label: str) -> int:
    raw = os.environ.get(SEED_ENV)
    seed = int(raw) if raw else random.SystemRandom().randrange(1 << 31)
    print(f"\n[{label}] seed {seed} (replay: {SEED_ENV}={seed})")
    return seed


def full_rounds(group: Group, rng: random.Random) -> None:
    """Three members, then five rounds; every round ends with the group settled and
    learning. Each armed member is sure to meet its point where it is meant to: a member
    that holds 3 of 6 partitions when a third member joins gives one up."""
    group.start()
    group.start()
    group.wait_settled("m1 and m2 start")
    in_revoke = group.start("in_revoke:1")  # joins last: nothing revoked from it yet
    group.wait_settled("m3 joins")
    first = group.members[0]
    # 1. a graceful leave: its partitions are handed over (the revoke checkpoints, commits)
    group.sigterm(first)
    group.wait_settled("m1 leaves")  # m2 and m3 hold 3 each
    # 2. a join: m2 and m3 give one each; m3 dies at the start of its revoke
    assert in_revoke.alive
    mid_handover = group.start("mid_handover:1")
    group.expect_crash(in_revoke, "giving a partition to m4")
    group.wait_settled("m3 crashed in its revoke")  # m2 and m4 hold 3 each
    # 3. a join: m4 dies after checkpointing the slot it gives up, before committing it
    assert mid_handover.alive
    group.start()
    group.expect_crash(mid_handover, "giving a partition to m5")
    group.wait_settled("m4 crashed mid hand-over")
    # 4. kill -9 at a random moment of a random member
    victim = rng.choice(group.alive())
    time.sleep(rng.uniform(0.0, 2.5))  # the random moment itself, not a synchronisation
    group.kill(victim)
    group.wait_settled(f"{victim.name} killed")
    # 5. a join that dies at its third checkpoint: a write durable, its commit not made
    checkpoint_crash = group.start("after_checkpoint:3")
    group.expect_crash(checkpoint_crash, "a periodic checkpoint")
    group.wait_settled(f"{checkpoint_crash.name} crashed after a checkpoint")


def short_rounds(group: Group, rng: random.Random) -> None:
    """Three members at once; a random kill -9; a join that dies after its first claim;
    a join."""
    for _ in range(3):
        group.start()
    group.wait_settled("three members start")
    victim = rng.choice(group.alive())
    time.sleep(rng.uniform(0.0, 2.0))  # the random moment itself, not a synchronisation
    group.kill(victim)
    group.wait_settled(f"{victim.name} killed")
    # A new owner that dies right after claiming a slot, before restoring it: the next
    # owner claims it over and restores what the previous owner had checkpointed.
    claim_crash = group.start("after_claim:1")
    group.expect_crash(claim_crash, "claiming its first slot")
    group.wait_settled(f"{claim_crash.name} crashed after a claim")
    group.start()
    group.wait_settled("a member joins")


def run_scenario(
    label: str,
    config: dict[str, Any],
    tmp_path: Path,
    env: Mapping[str, str],
    rounds: Callable[[Group, random.Random], None],
    batch: int,
    keys: int | None = None,
) -> None:
    """``keys``: key scope's producer, each record in its key's partition, ``keys`` keys."""
    seed = seed_of(label)
    bootstrap, topic = config["kafka"]["bootstrap_servers"], topic_of(config)
    if keys is None:
        producer = CountingProducer(bootstrap, topic, PARTITIONS, seed=seed)
    else:
        producer = CountingProducer(bootstrap, topic, PARTITIONS, keys, seed, by_key=True)
    producer.produce(3000)
    group = Group(config, tmp_path, {TESTING_ENV: "1", **env})
    began = time.monotonic()
    try:
        with trickle(producer, batch):
            rounds(group, random.Random(seed))
        # Every record acked, read back: the ends the slots and commits must reach.
        produced = produced_samples(bootstrap, topic, at_least=producer.produced)
        ends = ends_of(topic, produced)
        group.start()  # a last member joins; the group drains the topic
        group.wait_settled("the last member joins", learning=False)
        wait_for(drained(group, ends), 90.0, f"slots and commits at {ends}", interval=0.3)
        group.stop_all()
    finally:
        group.close()
    elapsed = time.monotonic() - began
    judge(label, group, config, producer, produced, ends, elapsed)


def ends_of(topic: str, samples: list[Sample]) -> dict[str, int]:
    """Each partition's offset after the last record read (not the broker's high
    watermark: Tansu answers the base offset of the partition's last batch)."""
    ends = dict.fromkeys(range(PARTITIONS), 0)
    for partition, offset, _key in samples:
        ends[partition] = max(ends[partition], offset + 1)
    return {f"{topic}:{p}": end for p, end in ends.items()}


def judge(
    label: str,
    group: Group,
    config: dict[str, Any],
    producer: CountingProducer,
    produced: list[Sample],
    ends: Mapping[str, int],
    elapsed: float,
) -> None:
    """Both oracles, printed whatever they find, then asserted."""
    bootstrap, topic = config["kafka"]["bootstrap_servers"], topic_of(config)
    slots = read_slots(config["checkpoint"]["dir"], KEY, store_settings(config))
    verdict = judge_counts(produced, combined_counts(s.learnt for s in slots.values()))
    keys = [(topic, p) for p in range(PARTITIONS)]
    committed = committed_offsets(bootstrap, config["kafka"]["group_id"], keys)
    logs = [m.log.refresh() for m in group.members]
    violations = [v for o in logs for v in o.violations]
    commits, synchronous = sum(o.commits for o in logs), sum(o.synchronous for o in logs)
    assigned, revoked, lost = (
        sum(getattr(o, k) for o in logs) for k in ("assigned", "revoked", "lost")
    )
    produced_by = Counter(p for p, _o, _k in produced)
    print(f"[{label}] {'; '.join(group.events)}")
    for p in range(PARTITIONS):
        slot = slots.get(f"{topic}:{p}")
        learnt = sum(slot.learnt.values()) if slot else 0
        print(
            f"[{label}] partition {p}: produced {produced_by[p]}, learnt {learnt}, "
            f"lost {verdict.lost_by_partition.get(p, 0)}, "
            f"twice {verdict.twice_by_partition.get(p, 0)}, "
            f"misplaced {slot.misplaced() if slot else 0}, claims {slot.token if slot else 0}, "
            f"slot offset {slot.offsets if slot else {}}, committed {committed[(topic, p)]}"
        )
    collected = sum(o.key_objects_deleted for o in logs)
    if any(s.keys for s in slots.values()):
        print(
            f"[{label}] key models {sum(s.keys for s in slots.values())}, "
            f"tuples in another key's model {sum(s.mixed_keys for s in slots.values())}; "
            f"key objects deleted by the collectors {collected}, left in the store "
            f"{key_objects_left(config)}"
        )
    print(
        f"[{label}] {verdict.line()}; commits checked {commits} ({synchronous} synchronous), "
        f"unowned {len(violations)}; hand-overs {assigned - PARTITIONS} (assigned {assigned}, "
        f"revoked {revoked}, lost {lost}; slot claims {sum(s.token for s in slots.values())}); "
        f"kill -9 {group.kills}; {elapsed:.0f} s"
    )
    assert verdict.produced == producer.produced
    assert (verdict.lost, verdict.twice, verdict.unexpected) == (0, 0, 0), verdict.examples
    assert all(slot.misplaced() == 0 and slot.mixed_keys == 0 for slot in slots.values())
    assert {k: v for s in slots.values() for k, v in s.offsets.items()} == dict(ends)
    assert {f"{t}:{p}": o for (t, p), o in committed.items()} == dict(ends)
    assert violations == [], violations[:10]
    assert commits > 0 and synchronous > 0  # the check saw commits, hand-overs among them
    # Key scope: the collector deleted objects all along, and every key read above (each
    # named object of each head) was still there.
    assert collected > 0 or not any(s.keys for s in slots.values())
    assert assigned > PARTITIONS and revoked > 0


@pytest.mark.parametrize(
    ("mode", "scope"),
    [("per_record", "partition"), ("mini_batch", "partition"), ("mini_batch", "key")],
)
def test_members_join_leave_and_crash_mid_handover_on_seaweedfs(
    mode: str,
    scope: str,
    kafka_broker: BrokerHandle,
    s3_server: SeaweedFS,
    s3_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s3_env = s3_server.admin.env()
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)  # the oracle reads the bucket from this process
    store = {
        "checkpoint": {"dir": f"{s3_url}/checkpoints"},
        "object_store": {
            "endpoint_url": s3_server.endpoint_url,
            "region": s3_server.region,
            "path_style": True,
        },
    }
    keyed = KEY_SCOPE if scope == "key" else {}
    config = scale_out_config(tmp_path, kafka_broker, mode, store, keyed)
    keys = 50 if scope == "key" else None
    label = f"s3 {mode}" + (" key" if keys else "")
    run_scenario(label, config, tmp_path, s3_env, full_rounds, batch=200, keys=keys)


def test_members_on_a_shared_folder_store(kafka_broker: BrokerHandle, tmp_path: Path) -> None:
    """Short form on a folder the members share (flock CAS): a kill -9 and a join."""
    config = scale_out_config(tmp_path, kafka_broker, "per_record")
    run_scenario("folder per_record", config, tmp_path, {}, short_rounds, batch=200)


def test_key_scope_through_the_same_rounds_on_a_shared_folder(
    kafka_broker: BrokerHandle, tmp_path: Path
) -> None:
    """Key scope (a model per key: 50 keys, room for 10 per member, so keys are evicted
    and loaded back throughout) through the full rounds, hand-over crash points included.
    Every key model (live in a slot's head, or the evicted object it names) must hold
    its own key's records only, and all of them together every record once."""
    config = scale_out_config(tmp_path, kafka_broker, "per_record", KEY_SCOPE)
    run_scenario("folder key per_record", config, tmp_path, {}, full_rounds, batch=200, keys=50)


def test_key_scope_on_tansu_through_a_kill_and_a_crash_after_a_claim(
    tansu_broker: BrokerHandle, tmp_path: Path
) -> None:
    """The short rounds on Tansu, key scope on a shared folder: the same oracles, on a
    broker whose group coordinator is not Apache Kafka's."""
    config = scale_out_config(tmp_path, tansu_broker, "mini_batch", KEY_SCOPE)
    run_scenario("tansu folder key mini_batch", config, tmp_path, {}, short_rounds, 200, 50)
