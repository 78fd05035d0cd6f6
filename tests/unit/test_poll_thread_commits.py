"""PollThreadCommits: the learner thread's commits wait for the poll thread.

librdkafka blocks a commit made on another thread while a rebalance callback runs on the
poll thread, so only the poll thread may commit; these tests pin the queue's rules.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from stream_trainer.operations.partition_service import LoggedCommits, PollThreadCommits
from stream_trainer.state.ledger import TopicPartitionKey

A, B = ("t", 0), ("t", 1)


class Recorded:
    """A source that records each commit and the thread that made it."""

    def __init__(self) -> None:
        self.commits: list[tuple[dict[TopicPartitionKey, int], bool, int]] = []

    def commit(
        self, offsets: Mapping[TopicPartitionKey, int], asynchronous: bool = False
    ) -> dict[TopicPartitionKey, int]:
        self.commits.append((dict(offsets), asynchronous, threading.get_ident()))
        return dict(offsets)


def commits_over(source: Recorded) -> PollThreadCommits:
    inner: Any = source
    return PollThreadCommits(LoggedCommits(lambda: inner))


def on_another_thread(commits: PollThreadCommits, offsets: dict[TopicPartitionKey, int]) -> None:
    thread = threading.Thread(target=commits.commit, args=(offsets,), kwargs={"asynchronous": True})
    thread.start()
    thread.join()


def test_unbound_commits_are_made_at_once_on_any_thread() -> None:
    source = Recorded()
    commits = commits_over(source)
    on_another_thread(commits, {A: 5})
    assert [c[0] for c in source.commits] == [{A: 5}]


def test_the_learners_commits_wait_for_the_poll_thread_newest_offset_first() -> None:
    source = Recorded()
    commits = commits_over(source)
    commits.bind()
    on_another_thread(commits, {A: 5, B: 3})
    on_another_thread(commits, {A: 9})
    on_another_thread(commits, {A: 7})  # an older checkpoint's, collected late: not back
    assert source.commits == []
    commits.flush()
    [(offsets, asynchronous, thread)] = source.commits
    assert offsets == {A: 9, B: 3}
    assert asynchronous and thread == threading.get_ident()
    commits.flush()
    assert len(source.commits) == 1  # nothing left queued


def test_the_poll_threads_own_commits_are_made_at_once_synchronous_ones_too() -> None:
    source = Recorded()
    commits = commits_over(source)
    commits.bind()
    commits.commit({A: 4}, asynchronous=False)
    assert source.commits == [({A: 4}, False, threading.get_ident())]


def test_a_revoked_or_lost_partitions_queued_commit_is_dropped() -> None:
    source = Recorded()
    commits = commits_over(source)
    commits.bind()
    on_another_thread(commits, {A: 5, B: 3})
    commits.drop([A])
    commits.flush()
    assert [c[0] for c in source.commits] == [{B: 3}]


def test_a_refused_commit_is_made_again_unless_a_newer_one_was_made_or_it_left() -> None:
    source = Recorded()
    commits = commits_over(source)
    commits.bind()
    commits.commit({A: 5, B: 3}, asynchronous=True)
    commits.commit({A: 8}, asynchronous=True)
    commits.retry({A: 5, B: 3})  # the broker refused the first (a rebalance in progress)
    commits.flush()
    assert source.commits[-1][0] == {B: 3}  # A's 5 is older than the 8 made since
    commits.drop([B])
    commits.retry({B: 3})  # revoked since: never again
    commits.flush()
    assert len(source.commits) == 3
    commits.owned_again([B])
    commits.retry({B: 3})  # assigned again, and still its newest: made again
    commits.flush()
    assert source.commits[-1][0] == {B: 3}
