"""helpers.support.ranks: the jobs dealt out round-robin, each to one process; a lone process starts nothing."""
from helpers.support import ranks


def test_every_job_goes_to_one_process_round_robin():
    jobs = [f"job {i}" for i in range(7)]
    shares = [ranks.my_share(jobs, process=k, processes=3) for k in range(3)]
    assert shares == [["job 0", "job 3", "job 6"], ["job 1", "job 4"], ["job 2", "job 5"]]
    assert sorted(sum(shares, [])) == jobs  # each once
    # the first jobs of the list (the grid's headline comparison) are the first of every process
    assert [share[0] for share in shares] == jobs[:3]


def test_a_lone_process_is_process_0_of_1_and_starts_nothing(monkeypatch):
    from accelerate.state import PartialState

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    before = dict(PartialState._shared_state)
    ranks.start()
    ranks.wait_for_everyone()
    with ranks.main_first():
        value = ranks.from_main({"a": 1})
    assert value == {"a": 1} and ranks.is_main() and ranks.my_share([1, 2, 3]) == [1, 2, 3]
    assert dict(PartialState._shared_state) == before  # no Accelerate state, no torch.distributed
