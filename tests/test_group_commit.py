"""GroupCommitter: how deliveries queue into groups and how many groups commit at once."""

import asyncio

import pytest

from mailadmin.mailin.lmtp import GroupCommitter


class GatedExecutor:
    """Runs ``deliver_group`` stand-ins one gate at a time, recording each group and the overlap."""

    def __init__(self) -> None:
        self.groups: list[list[str]] = []
        self.running = 0
        self.most_running = 0
        self.gate = asyncio.Event()

    async def run(self, function, deliveries):
        self.groups.append(list(deliveries))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        await self.gate.wait()
        self.running -= 1
        if "broken" in deliveries:
            raise RuntimeError("database gone")
        return [[f"stored {delivery}"] for delivery in deliveries]


async def commit_all(writers: int, deliveries: list[str], max_group: int = 64):
    """Submit one delivery per writer, let the writers take them, then submit the rest."""
    executor = GatedExecutor()
    committer = GroupCommitter(executor, max_group=max_group, writers=writers)
    futures = []
    for delivery in deliveries[:writers]:
        futures.append(committer.submit(delivery))
        await asyncio.sleep(0)  # a writer takes it as a group of its own
    futures += [committer.submit(delivery) for delivery in deliveries[writers:]]
    executor.gate.set()
    results = await asyncio.gather(*futures, return_exceptions=True)
    return executor, results


@pytest.mark.parametrize(("writers", "first_groups"), [(1, [["m0"]]), (2, [["m0"], ["m1"]])])
def test_deliveries_that_arrive_while_groups_commit_share_the_next_group(writers, first_groups):
    executor, results = asyncio.run(commit_all(writers, [f"m{n}" for n in range(6)]))
    assert executor.groups[:writers] == first_groups
    assert sorted(sum(executor.groups, [])) == [f"m{n}" for n in range(6)]
    assert len(executor.groups) == writers + 1  # the rest went together
    assert executor.most_running == writers
    assert results == [[f"stored m{n}"] for n in range(6)]


def test_a_group_is_cut_at_max_group_messages():
    executor, _ = asyncio.run(commit_all(1, [f"m{n}" for n in range(7)], max_group=3))
    assert [len(group) for group in executor.groups] == [1, 3, 3]  # after the first, 6 queued


def test_a_failed_group_fails_only_its_own_deliveries():
    executor, results = asyncio.run(commit_all(1, ["m0", "broken", "m2"]))
    assert executor.groups == [["m0"], ["broken", "m2"]]
    assert results[0] == ["stored m0"]
    assert [type(result) for result in results[1:]] == [RuntimeError, RuntimeError]


@pytest.mark.parametrize("writers", [1, 2])
def test_a_delivery_submitted_as_the_last_group_finishes_is_still_stored(writers):
    """The session woken by one commit may submit at once: a writer must be there for it."""

    async def scenario():
        executor = GatedExecutor()
        executor.gate.set()
        committer = GroupCommitter(executor, max_group=64, writers=writers)
        late: list[asyncio.Future] = []
        first = committer.submit("m0")
        first.add_done_callback(lambda _: late.append(committer.submit("late")))
        await first
        return await asyncio.wait_for(late[0], timeout=5)

    assert asyncio.run(scenario()) == ["stored late"]
