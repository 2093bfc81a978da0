"""Canary promotion: a new version first answers a share of the requests naming no version; the labels clients send
decide whether it becomes the default or is rolled back, and the decision is visible in ListModels and counted."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from proto.mnist.v1 import classifier_pb2 as pb
from server.app import MnistServer
from server.config import BUNDLED_MODEL
from server.models.canary import Canary, CanarySettings, TrialJudge, canary_settings, pooled_trials
from server.models.repository import AgreedDefaults, ModelRepository, scan_repository
from tests.support import Harness, test_config
from tests.test_repository import MODEL, FakeLoader, config_pbtxt, publish

CANARY = (
    'parameters { key: "canary_share" value { string_value: "0.5" } }\n'
    'parameters { key: "canary_min_labels" value { string_value: "15" } }'
)


def digits_off_by_one() -> bytes:
    """The bundled model with its output rows turned: it answers d + 1 for a d, confidently wrong."""
    proto = onnx.load(str(BUNDLED_MODEL))
    for initializer in proto.graph.initializer:
        if initializer.name in ("model.head.3.weight", "model.head.3.bias"):
            turned = np.roll(numpy_helper.to_array(initializer), 1, axis=0)
            initializer.CopyFrom(numpy_helper.from_array(turned, initializer.name))
    return proto.SerializeToString()


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    publish(tmp_path, 1)
    config_pbtxt(tmp_path, CANARY)
    return tmp_path


@pytest.fixture
def served(repository: Path) -> Iterator[Harness]:
    config = test_config(model_repository=str(repository), repository_poll_seconds=0.1, verify_model="off")
    harness = Harness(MnistServer(config).start())
    yield harness
    harness.close()


def versions(harness: Harness) -> dict[str, pb.ModelVersionStatus]:
    return {m.version: m for m in harness.stub.ListModels(pb.ListModelsRequest(), timeout=5).models}


def wait_for(harness: Harness, condition, seconds: float = 60) -> dict[str, pb.ModelVersionStatus]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        listed = versions(harness)
        if condition(listed):
            return listed
        time.sleep(0.1)
    raise AssertionError(f"not reached in {seconds} s: {listed}")


def label_answers(harness: Harness, digits: np.ndarray, labels: np.ndarray, until) -> dict[str, int]:
    """Classify digits naming no version and send each answer's true label, until `until(ListModels)`."""
    answered: dict[str, int] = {}
    for image, label in zip(digits, labels, strict=True):
        answer = harness.stub.Classify(pb.ClassifyRequest(raw=image.tobytes()), timeout=10)
        answered[answer.model_version] = answered.get(answer.model_version, 0) + 1
        harness.stub.Feedback(pb.FeedbackRequest(request_id=answer.request_id, label=int(label)), timeout=10)
        if until(versions(harness)):
            return answered
    raise AssertionError(f"no decision after {len(digits)} labelled answers: {versions(harness)}")


def test_a_new_version_that_is_as_good_is_promoted_after_its_trial(served, repository, mnist_test_digits) -> None:
    images, labels = mnist_test_digits
    right = []  # digits version 1 reads right: version 2, the same file, reads them alike
    for start in range(0, 400, 16):
        requests = [pb.ClassifyRequest(raw=image.tobytes()) for image in images[start : start + 16]]
        batch = pb.ClassifyBatchRequest(requests=requests)
        answers = served.stub.ClassifyBatch(batch, timeout=10).responses
        right += [start + n for n, a in enumerate(answers) if a.digit == labels[start + n]]
    publish(repository, 2)
    trial = wait_for(served, lambda v: "2" in v and v["2"].reason.startswith("canary"))
    assert trial["1"].is_default and not trial["2"].is_default  # the old one stays the default during the trial
    answered = label_answers(served, images[right], labels[right], lambda v: v.get("2") and v["2"].is_default)
    assert answered.get("1", 0) >= 15 and answered.get("2", 0) >= 15  # both took a share of the traffic
    listed = wait_for(served, lambda v: "1" not in v)  # the policy (latest) no longer wants it: unloaded
    assert listed["2"].state == "READY" and listed["2"].reason.startswith("promoted after a canary: live accuracy")
    metrics = served.metrics()
    assert metrics[f'mnist_canary_events_total{{event="PROMOTED",model="{MODEL}",version="2"}}'] == 1
    assert metrics[f'mnist_canary_events_total{{event="STARTED",model="{MODEL}",version="2"}}'] == 1


def test_a_new_version_that_is_worse_is_rolled_back_and_not_loaded_again(served, repository, mnist_test_digits) -> None:
    images, labels = mnist_test_digits
    publish(repository, 2, content=digits_off_by_one())
    wait_for(served, lambda v: "2" in v and v["2"].reason.startswith("canary"))
    label_answers(served, images[:400], labels[:400], lambda v: v.get("2") and v["2"].state == "ROLLED_BACK")
    listed = versions(served)
    assert listed["1"].is_default and listed["1"].state == "READY"
    assert "worse than version 1's" in listed["2"].reason
    time.sleep(1.0)  # polls come and go: the rolled-back file is not loaded again
    assert versions(served)["2"].state == "ROLLED_BACK"
    answers = {
        served.stub.Classify(pb.ClassifyRequest(raw=image.tobytes()), timeout=10).model_version for image in images[:30]
    }
    assert answers == {"1"}
    metrics = served.metrics()
    assert metrics[f'mnist_canary_events_total{{event="ROLLED_BACK",model="{MODEL}",version="2"}}'] == 1


def test_a_rollback_is_kept_in_the_version_folder_so_a_restart_does_not_serve_it(
    served, repository, mnist_test_digits
) -> None:
    images, labels = mnist_test_digits
    publish(repository, 2, content=digits_off_by_one())
    wait_for(served, lambda v: "2" in v and v["2"].reason.startswith("canary"))
    label_answers(served, images[:400], labels[:400], lambda v: v.get("2") and v["2"].state == "ROLLED_BACK")
    assert "worse than version 1's" in (repository / MODEL / "2" / "ROLLED_BACK").read_text()
    config = test_config(model_repository=str(repository), repository_poll_seconds=0.1, verify_model="off")
    restarted = Harness(MnistServer(config).start())  # a restart, or another replica on the same repository
    try:
        listed = versions(restarted)
        assert listed["1"].is_default and listed["2"].state == "ROLLED_BACK" and "worse than" in listed["2"].reason
        request = pb.ClassifyRequest(raw=images[0].tobytes())
        assert {restarted.stub.Classify(request, timeout=10).model_version for _ in range(20)} == {"1"}
    finally:
        restarted.close()


def test_removing_the_new_version_or_the_canary_settings_ends_the_trial_undecided(
    served, repository, mnist_test_digits
) -> None:
    images, _ = mnist_test_digits
    publish(repository, 2)
    wait_for(served, lambda v: "2" in v and v["2"].reason.startswith("canary"))
    config_pbtxt(repository, "")  # the operator takes the canary settings away: the newest is the default again
    listed = wait_for(served, lambda v: v.get("2") and v["2"].is_default)
    assert not listed["2"].reason.startswith("canary")
    publish(repository, 3)
    config_pbtxt(repository, CANARY)
    wait_for(served, lambda v: "3" in v and v["3"].reason.startswith("canary"))
    shutil.rmtree(repository / MODEL / "3")  # the operator withdraws the new version mid-trial
    listed = wait_for(served, lambda v: "3" not in v and v.get("2") and v["2"].is_default)
    metrics = served.metrics()
    assert metrics[f'mnist_canary_events_total{{event="ENDED",model="{MODEL}",version="2"}}'] == 1
    assert metrics[f'mnist_canary_events_total{{event="ENDED",model="{MODEL}",version="3"}}'] == 1


def test_during_a_trial_model_metadata_describes_the_default(served, repository) -> None:
    publish(repository, 2)
    wait_for(served, lambda v: "2" in v and v["2"].reason.startswith("canary"))
    infos = {served.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5).version for _ in range(20)}
    assert infos == {"1"}


def test_a_version_named_by_the_request_is_never_rerouted_by_a_canary(served, repository, mnist_test_digits) -> None:
    images, _ = mnist_test_digits
    publish(repository, 2)
    wait_for(served, lambda v: "2" in v and v["2"].reason.startswith("canary"))
    for version in ("1", "2"):
        request = pb.ClassifyRequest(raw=images[0].tobytes(), model_version=version)
        assert {served.stub.Classify(request, timeout=10).model_version for _ in range(10)} == {version}


# --- the rules, on their own ---------------------------------------------------------------------------------------


def trial(new: int, old: int, labels: int = 200, margin: float = 0.0) -> Canary:
    """A trial where the new version got `new` of `labels` right and the old one `old`."""
    canary = Canary("m", "1", "2", CanarySettings(share=0.2, min_labels=labels, margin=margin))
    for n in range(labels):
        canary.observe("2", n < new)
        canary.observe("1", n < old)
    return canary


def test_the_verdict_waits_for_enough_labels_on_both_sides() -> None:
    canary = Canary("m", "1", "2", CanarySettings(share=0.2, min_labels=10))
    for _ in range(10):
        canary.observe("2", False)
    assert canary.decision() is None  # the old one has no labels yet
    for _ in range(9):
        canary.observe("1", True)
    assert canary.decision() is None
    canary.observe("1", True)
    assert canary.decision()[0] == "ROLLED_BACK"


def test_worse_means_worse_beyond_chance_and_the_margin() -> None:
    assert trial(190, 194).decision()[0] == "PROMOTED"  # 95% against 97% over 200 each: within chance
    verdict, why = trial(180, 200).decision()  # 90% against 100%: far beyond it
    assert verdict == "ROLLED_BACK" and "90.0%" in why and "100.0%" in why
    assert trial(180, 200, margin=0.15).decision()[0] == "PROMOTED"  # unless the operator allows that much
    assert trial(200, 180).decision()[0] == "PROMOTED"
    assert trial(0, 199).decision()[0] == "ROLLED_BACK"  # a broken version, whatever the numbers


def test_canary_settings_are_checked_where_they_are_written(tmp_path: Path) -> None:
    assert canary_settings({}) is None and canary_settings({"canary_share": "0"}) is None
    assert canary_settings({"canary_share": "0.1"}) == CanarySettings(0.1, 200, 0.0)
    for bad in ({"canary_share": "1"}, {"canary_share": "half"}, {"canary_min_labels": "5"}):
        with pytest.raises(ValueError):
            canary_settings(bad)
    publish(tmp_path, 1)
    config_pbtxt(tmp_path, 'parameters { key: "canary_share" value { string_value: "2" } }')
    assert "canary_share" in scan_repository(tmp_path)[MODEL].problem


# --- with `--workers N`: every worker runs the trial, the supervisor decides on all their labels ------------------


def report(new_right: int, new: int, old_right: int, old: int, candidate: str = "2") -> dict:
    """One worker's trials, as its status carries them (ModelRepository.trials_now)."""
    return {
        "m": {
            "stable": "1", "candidate": candidate, "share": 0.5, "min_labels": 10, "margin": 0.0,
            "labelled": {candidate: new, "1": old}, "right": {candidate: new_right, "1": old_right},
        }
    }  # fmt: skip


def test_the_supervisor_decides_on_every_workers_labels_summed() -> None:
    halves = [report(0, 5, 5, 5), report(0, 5, 5, 5)]  # 5 labels a side in each worker: 10 in all
    assert all(alone.decision() is None for half in halves for alone in pooled_trials([half]))  # too few in each
    (pooled,) = pooled_trials(halves)
    assert (pooled.labelled, pooled.right) == ({"2": 10, "1": 10}, {"2": 0, "1": 10})
    assert pooled.decision()[0] == "ROLLED_BACK"
    assert pooled_trials([report(0, 5, 5, 5), {"m": {"stable": "1"}}, {"m": "garbage"}])[0].labelled == {"2": 5, "1": 5}


def test_the_supervisor_counts_each_event_once_and_sends_a_verdict_until_each_worker_has_taken_it() -> None:
    judge = TrialJudge()
    events, verdicts = judge.update({"w0": report(0, 2, 2, 2), "w1": report(0, 2, 2, 2)})
    assert [e[2] for e in events] == ["STARTED"] and verdicts == {}
    events, verdicts = judge.update({"w0": report(0, 5, 5, 5), "w1": report(0, 5, 5, 5)})
    assert [(e[1], e[2]) for e in events] == [("2", "ROLLED_BACK")] and set(verdicts) == {"w0", "w1"}
    assert verdicts["w0"][0][:3] == ["m", "2", "ROLLED_BACK"]
    events, verdicts = judge.update({"w0": {}, "w1": report(0, 5, 5, 5)})  # w0 took it; w1 has not yet
    assert events == [] and set(verdicts) == {"w1"}
    events, verdicts = judge.update({"w0": {}, "w1": {}})  # taken everywhere: the verdict is forgotten
    assert events == [] and verdicts == {} and judge.verdicts == {}
    # the same versions tried again (the ROLLED_BACK marker deleted): a trial of its own, decided on its own labels
    events, verdicts = judge.update({"w0": report(5, 5, 5, 5), "w1": report(5, 5, 5, 5)})
    assert [e[2] for e in events] == ["STARTED", "PROMOTED"]
    # a trial that goes away undecided (the new version removed) ends
    judge.update({"w0": report(0, 1, 1, 1, candidate="3")})
    events, _ = judge.update({"w0": {}})
    assert [(e[1], e[2]) for e in events] == [("3", "ENDED")]


def test_a_trial_the_workers_agreement_has_moved_past_ends_and_stops_taking_a_share(tmp_path: Path) -> None:
    async def scenario() -> None:
        publish(tmp_path, 1, content=b"v1")
        config_pbtxt(tmp_path, CANARY)
        repository = ModelRepository(FakeLoader(), tmp_path, grace=0)
        repository.trials_judged_here = False
        repository.propose_defaults(AgreedDefaults(1, {MODEL: "1"}, time.monotonic()))
        await repository.poll(settle=False)
        publish(tmp_path, 2, content=b"v2")
        await repository.poll(settle=False)
        assert repository.trials_now[MODEL]["candidate"] == "2"
        assert {repository.lease().served.version for _ in range(200)} == {"1", "2"}  # the trial's share
        # the others promoted 2 without this worker's verdict reaching it (it was starting again meanwhile)
        repository.propose_defaults(AgreedDefaults(2, {MODEL: "2"}, time.monotonic()))
        repository.follow_agreement()
        assert repository.trials_now == {} and repository.local_defaults() == {MODEL: "2"}
        assert {repository.lease().served.version for _ in range(200)} == {"2"}
        await repository.close()

    asyncio.run(scenario())


def test_a_worker_started_again_after_a_promotion_runs_no_trial_and_routes_by_the_agreement(tmp_path: Path) -> None:
    async def scenario() -> None:
        publish(tmp_path, 1, content=b"v1")
        publish(tmp_path, 2, content=b"v2")
        (tmp_path / MODEL / "config.pbtxt").write_text(f'name: "{MODEL}"\nversion_policy: {{ all {{ }} }}\n{CANARY}\n')
        repository = ModelRepository(FakeLoader(), tmp_path, grace=0)
        repository.trials_judged_here = False
        repository.propose_defaults(AgreedDefaults(3, {MODEL: "2"}, time.monotonic()))  # the others promoted 2
        await repository.poll(settle=False)
        assert repository.trials_now == {} and repository.local_defaults() == {MODEL: "2"}
        assert {repository.lease().served.version for _ in range(200)} == {"2"}
        await repository.close()

    asyncio.run(scenario())


def test_a_worker_counts_its_labels_but_takes_the_verdict_from_its_supervisor(tmp_path: Path) -> None:
    async def scenario() -> None:
        publish(tmp_path, 1, content=b"v1")
        config_pbtxt(tmp_path, CANARY)  # 15 labels a side
        repository = ModelRepository(FakeLoader(), tmp_path, grace=0)
        repository.trials_judged_here = False
        await repository.poll(settle=False)
        publish(tmp_path, 2, content=b"v2")
        await repository.poll(settle=False)
        assert repository.local_defaults() == {MODEL: "1"}  # on trial: it tells its supervisor the stable version
        for _ in range(40):
            repository.observe_label(MODEL, "2", False)
            repository.observe_label(MODEL, "1", True)
        trial = repository.trials_now[MODEL]
        assert (trial["candidate"], trial["labelled"], trial["right"]) == ("2", {"2": 40, "1": 40}, {"2": 0, "1": 40})
        assert {s.version for s in repository.served()} == {"1", "2"}  # far worse, but not decided here

        repository.conclude_trial(MODEL, "2", "ROLLED_BACK", "worse on every worker's labels")
        await asyncio.sleep(0.05)
        assert {s.version for s in repository.served()} == {"1"} and repository.trials_now == {}
        assert (tmp_path / MODEL / "2" / "ROLLED_BACK").read_text() == "worse on every worker's labels\n"
        await repository.poll(settle=False)  # the folder's policy passes over a version rolled back
        assert repository.local_defaults() == {MODEL: "1"}

        publish(tmp_path, 3, content=b"v3")
        await repository.poll(settle=False)
        assert repository.trials_now[MODEL]["candidate"] == "3"
        repository.conclude_trial(MODEL, "3", "PROMOTED", "as good")
        assert repository.local_defaults() == {MODEL: "3"} and repository.trials_now == {}
        repository.conclude_trial(MODEL, "3", "ROLLED_BACK", "a late second verdict is ignored")
        assert repository.local_defaults() == {MODEL: "3"}
        await repository.close()

    asyncio.run(scenario())
