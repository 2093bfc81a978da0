"""The models the server serves: every version in a model repository, swapped in and out without a failed call.

Layout (Triton's, the one `mnist-export --publish` and `--triton-repo` write):

    DIR/<model>/config.pbtxt            optional: version_policy, and parameters { key: "default_version" ... }
    DIR/<model>/<version>/model.onnx    versions are folders named by whole numbers; model.fp16.onnx beside

A version's life: LOADING (the engine is built, the model verified on stored digits, every batch shape
warmed up) -> READY (only now does any request reach it) -> UNLOADING (no new request reaches it; those
that already hold it finish) -> gone. A version that fails to load is FAILED, says why, and never takes
traffic; what served before keeps serving, and the same file is not tried again until it changes.

Requests hold a version with `lease()` for as long as they use it, so a version is closed only once
the last request using it has its answer: swapping versions under load fails no call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import numpy as np
from google.protobuf import text_format

from proto.inference import model_config_pb2
from server.errors import InvalidInput, NotFound, NotReady, ShuttingDown
from server.models.canary import PROMOTED, ROLLED_BACK, Canary, CanarySettings, canary_settings
from server.models.model_settings import ModelSettings, settings_from
from server.pipeline.model_pipeline import ENCODED, ModelPipeline

log = logging.getLogger("mnist.repository")

MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.pbtxt"
ROLLED_BACK_FILE = "ROLLED_BACK"  # in a version folder: a canary rolled it back (the reason inside); delete to retry
DEFAULT_VERSION_KEY = "default_version"  # a config.pbtxt parameter: requests naming no version get this one
READY, LOADING, FAILED, UNLOADING = "READY", "LOADING", "FAILED", "UNLOADING"
UNAVAILABLE = "UNAVAILABLE"  # a model an operator unloaded (Triton's word for it)

# Load, verify and warm up one version: (name or None, version or None, model file) -> a started pipeline.
# None name/version: take them from the model's own metadata (a single --model file).
Loader = Callable[[str | None, str | None, Path], Awaitable[ModelPipeline]]


@dataclass(frozen=True)
class ModelSpec:
    """What the repository folder says about one model: the versions its policy wants served, and its default."""

    name: str
    versions: dict[str, Path]  # version -> model file, those the version policy selects
    default_version: str = ""  # from config.pbtxt; "" = the newest READY version
    problem: str = ""  # the folder cannot be served as it is (unreadable config.pbtxt, ...)
    present: tuple[str, ...] = ()  # every version folder with a model file, wanted or not
    settings: ModelSettings = ModelSettings()  # batching, precision, instances: from config.pbtxt, else the flags
    canary: CanarySettings | None = None  # a newer version is tried on a share of the traffic first (canary.py)
    rolled_back: dict[str, str] = field(default_factory=dict)  # version -> why a canary rolled it back (its marker)


def version_key(version: str) -> tuple[int, int | str]:
    """Whole-number versions in numeric order, after any other name (a single file's metadata version)."""
    return (1, int(version)) if is_version_number(version) else (0, version)


def is_version_number(name: str) -> bool:
    """A version folder's name: a positive whole number in ASCII digits ("²" and "٣" are digits to Python)."""
    return name.isascii() and name.isdigit() and int(name) > 0


# What identifies one state of a version: its file's (mtime, size), and its model's settings when from a repository.
VersionState = tuple


def signature(path: Path) -> tuple[int, int]:
    """What identifies one state of a model file: a changed file is loaded again, a failed one not retried as is."""
    status = path.stat()
    return status.st_mtime_ns, status.st_size


def scan_repository(root: Path) -> dict[str, ModelSpec]:
    """Every model folder under `root` and the versions its policy selects (Triton's default: the latest one)."""
    specs = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found = {
            v.name: v / MODEL_FILE
            for v in folder.iterdir()
            if v.is_dir() and is_version_number(v.name) and (v / MODEL_FILE).is_file()
        }
        rolled_back = {}  # a canary's verdict, kept in the folder: such a version is not wanted again
        for version in list(found):
            marker = found[version].parent / ROLLED_BACK_FILE
            if marker.is_file():
                rolled_back[version] = marker.read_text(errors="replace").strip()
                del found[version]
        config = model_config_pb2.ModelConfig()
        problem = ""
        if (folder / CONFIG_FILE).is_file():
            try:
                text_format.Parse((folder / CONFIG_FILE).read_text(), config, allow_unknown_field=True)
            except (text_format.ParseError, UnicodeDecodeError) as err:
                problem = f"{folder.name}/{CONFIG_FILE} is not a valid model configuration: {err}"
        if config.name and config.name != folder.name:
            problem = f"{folder.name}/{CONFIG_FILE} names the model {config.name!r}; the folder must carry that name"
        settings = ModelSettings()
        if not problem:
            try:
                settings = settings_from(config)
            except ValueError as err:
                problem = f"{folder.name}/{CONFIG_FILE}: {err}"
        ordered = sorted(found, key=version_key)
        policy = config.version_policy.WhichOneof("policy_choice")
        if policy == "all":
            wanted = ordered
        elif policy == "specific":
            wanted = [v for v in ordered if int(v) in set(config.version_policy.specific.versions)]
        else:
            count = config.version_policy.latest.num_versions if policy == "latest" else 1
            wanted = ordered[-max(1, count) :]
        default = ""
        if DEFAULT_VERSION_KEY in config.parameters:
            default = config.parameters[DEFAULT_VERSION_KEY].string_value.strip()
        canary = None
        if not problem:
            try:
                canary = canary_settings({k: v.string_value.strip() for k, v in config.parameters.items()})
            except ValueError as err:
                problem = f"{folder.name}/{CONFIG_FILE}: {err}"
        if found and not wanted and not problem:
            problem = (
                f"{folder.name}/{CONFIG_FILE}: the version_policy selects none of the versions present "
                f"({', '.join(ordered)})"
            )
        versions = {v: found[v] for v in wanted}
        present = tuple(sorted([*found, *rolled_back], key=version_key))
        specs[folder.name] = ModelSpec(folder.name, versions, default, problem, present, settings, canary, rolled_back)
    return specs


@dataclass(frozen=True)
class AgreedDefaults:
    """The version of each model that requests naming none get, agreed by every worker of one host
    (server/supervisor.py), from `at` on: a time.monotonic() reading, one clock for all processes of the host.
    Each worker switches at that instant, at its first request after it: no client sees a new default answer
    on one worker and then the old one on another. A model not named here is routed as each worker decides."""

    seq: int
    defaults: dict[str, str]
    at: float


@dataclass(eq=False)
class ServedModel:
    """One READY (or draining) version and the requests holding it."""

    name: str
    version: str
    pipeline: ModelPipeline
    path: Path
    signature: VersionState
    load_seconds: float
    leases: int = 0
    retired: bool = False
    drained: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True)
class VersionStatus:
    name: str
    version: str
    state: str
    reason: str = ""
    is_default: bool = False
    load_seconds: float = 0.0


class RepositoryObserver:
    """What the repository reports as versions come and go (metrics, health); the default does nothing."""

    def on_loaded(self, name: str, version: str, seconds: float) -> None: ...

    def on_failed(self, name: str, version: str, reason: str) -> None: ...

    def on_changed(self, repository: ModelRepository) -> None: ...

    def on_request(self, name: str, version: str, seconds: float, error: BaseException | None) -> None: ...

    def on_unloaded(self, name: str, version: str) -> None: ...

    def on_canary(self, name: str, version: str, event: str, reason: str) -> None: ...  # STARTED, PROMOTED, ROLLED_BACK


class Lease:
    """One request's hold on a version (`with repository.lease(...) as served:`), reported to the observer when it
    ends. A class, not a generator: a refused call goes through it at every refusal, and throwing an exception
    into a generator-based context manager cost more than the rest of the refusal's bookkeeping."""

    __slots__ = ("served", "observer", "started")

    def __init__(self, served: ServedModel, observer: RepositoryObserver) -> None:
        self.served, self.observer = served, observer

    def __enter__(self) -> ServedModel:
        self.served.leases += 1
        self.started = time.perf_counter()
        return self.served

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        served = self.served
        served.leases -= 1
        if served.retired and served.leases == 0:
            served.drained.set()
        self.observer.on_request(served.name, served.version, time.perf_counter() - self.started, error)


class ModelRepository:
    """Routes each request to a READY version and runs the versions' lives; everything runs on the event loop."""

    def __init__(
        self,
        load: Loader,
        root: Path | None = None,
        observer: RepositoryObserver | None = None,
        default_model: str = "",
        grace: float = 10.0,
    ) -> None:
        self.root = root
        self._load = load
        self.observer = observer or RepositoryObserver()
        self.default_model_setting = default_model
        self.grace = grace
        self._served: dict[str, dict[str, ServedModel]] = {}
        self._defaults: dict[str, str] = {}  # model -> the version requests naming none get
        self._wanted_default: dict[str, str] = {}  # model -> default_version from its config.pbtxt
        self._settings: dict[str, ModelSettings] = {}  # model -> its own settings from its config.pbtxt
        self._status: dict[tuple[str, str], VersionStatus] = {}  # versions not READY: loading, failed, draining
        self._failed: dict[tuple[str, str], VersionState] = {}  # the file state that failed: not retried as is
        self._unloaded: set[str] = set()  # models unloaded by an operator: polling leaves them alone
        self._seen: dict[tuple[str, str], VersionState] = {}  # a file's state at the last poll: loads wait for it
        self._polled = False
        self._warned_default: set[tuple[str, str]] = set()
        self._ever_served = False
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task] = set()
        self.closed = False
        # Under a supervisor: the defaults its workers agreed on (set from another thread) and those in force here.
        self._proposed: AgreedDefaults | None = None
        self._agreed: AgreedDefaults | None = None
        self._wanted_versions: dict[str, set[str]] = {}  # model -> the versions its folder's policy selects now
        self._canary_settings: dict[str, CanarySettings] = {}  # model -> its canary settings, from config.pbtxt
        self._present: dict[str, set[str]] = {}  # model -> every version folder with a model file
        # False under a supervisor (--workers N): a trial runs in every worker, but the supervisor pools the workers'
        # labels (`trials_now`) and sends the verdict (`conclude_trial`); its agreement moves the defaults.
        self.trials_judged_here = True
        self.trials_now: dict[str, dict] = {}  # each running trial and its counts; replaced, never changed in place
        self._canaries: dict[str, Canary] = {}  # model -> the canary running now
        self._decided: dict[tuple[str, str], tuple[str, str]] = {}  # (model, version) -> canary verdict and why
        self._rolled_back: dict[tuple[str, str], VersionState] = {}  # the file state rolled back: not loaded again

    # --- routing ------------------------------------------------------------------------------------------

    @property
    def default_model(self) -> str:
        if self.default_model_setting:
            return self.default_model_setting
        return min(self._served) if self._served else ""

    def resolve(self, name: str = "", version: str = "") -> ServedModel:
        """The READY version a request names ("" = the defaults); NotFound naming what is served, NotReady while
        nothing is."""
        if self.closed:
            raise ShuttingDown("server is shutting down; retry on another replica")
        if self._proposed is not self._agreed:
            self.follow_agreement()
        name = name or self.default_model
        versions = self._served.get(name)
        if not versions:
            if not self._served:
                if self._unloaded:
                    unloaded = _names(dict.fromkeys(self._unloaded))
                    raise NotReady(f"no model is loaded: {unloaded} unloaded by an operator")
                if self._ever_served:
                    raise NotReady("no model is loaded now: the repository holds none that can be served")
                raise NotReady("model is still loading; retry shortly")
            raise NotFound(f"no model named '{name}'; this server serves {_names(self._served)}")
        version = version or self._defaults.get(name, "")
        served = versions.get(version)
        if served is None:
            state = self._status.get((name, version))
            detail = f" (it is {state.state}{': ' + state.reason if state.reason else ''})" if state else ""
            raise NotFound(
                f"model '{name}' has no version '{version}' ready{detail}; available: {_names(versions)} "
                "(or leave the version empty)"
            )
        return served

    def sole_version(self) -> ServedModel | None:
        """The one READY version, when exactly one is served and is its model's default (the usual server); else
        None. A request to such a server gets this version or an error, whatever model or version it names."""
        if self._proposed is not self._agreed:
            self.follow_agreement()
        if self.closed or len(self._served) != 1:
            return None
        ((name, versions),) = self._served.items()
        if len(versions) != 1:
            return None
        ((version, served),) = versions.items()
        return served if self._defaults.get(name) == version else None

    def lease(self, name: str = "", version: str = "") -> Lease:
        """Hold a version for one request: it is not closed until every request holding it has finished. A request
        naming no version of a model on a canary trial gets the new version at the trial's share (metadata calls,
        which `resolve`, describe the default)."""
        if not version and self._canaries:
            canary = self._canaries.get(name or self.default_model)
            if canary is not None and self._defaults.get(canary.model) == canary.stable:  # not past an agreement
                version = canary.pick()
        return Lease(self.resolve(name, version), self.observer)

    def served(self) -> list[ServedModel]:
        return [s for name in sorted(self._served) for _, s in sorted(self._served[name].items())]

    def statuses(self) -> list[VersionStatus]:
        """Every version the server knows of, READY or not, by model and version."""
        rows = {}
        for s in self.served():
            failure = self._status.get((s.name, s.version))
            reason = f"a newer file failed to load: {failure.reason}" if failure and failure.state == FAILED else ""
            is_default = self._defaults.get(s.name) == s.version
            canary = self._canaries.get(s.name)
            if canary is not None and s.version in (canary.stable, canary.candidate):
                reason = canary.describe()
            elif (s.name, s.version) in self._decided:
                verdict, why = self._decided[(s.name, s.version)]
                reason = f"{verdict.lower().replace('_', ' ')} after a canary: {why}"
            rows[(s.name, s.version)] = VersionStatus(s.name, s.version, READY, reason, is_default, s.load_seconds)
        for key, status in self._status.items():
            rows.setdefault(key, status)
        return [rows[key] for key in sorted(rows, key=lambda k: (k[0], version_key(k[1])))]

    def local_defaults(self) -> dict[str, str]:
        """The version each model's requests would get from this process alone (its config.pbtxt's default_version
        when READY, else the newest READY), among the versions the folder still wants: what a worker tells its
        supervisor. A version kept only because the workers' agreement still routes to it does not count, or a
        rollback by removing the newest version would never be agreed."""
        local = {name: self._local_default(name, versions) for name, versions in self._wanted_served().items()}
        for name, canary in self._canaries.items():  # on trial: the stable version stays the default meanwhile
            if name in local and canary.stable in self._served.get(name, {}):
                local[name] = canary.stable
        return local

    def ready_versions(self) -> dict[str, list[str]]:
        """Every READY version by model, those kept only for the workers' agreement included."""
        return {name: sorted(versions, key=version_key) for name, versions in self._served.items() if versions}

    def _wanted_served(self) -> dict[str, dict[str, ServedModel]]:
        """READY versions the folder still wants, by model (a model whose folder is gone has none)."""
        if self.root is None:  # one model file: nothing is wanted or unwanted by a folder
            return {name: versions for name, versions in self._served.items() if versions}
        wanted = {}
        for name, versions in self._served.items():
            kept = {v: s for v, s in versions.items() if v in self._wanted_versions.get(name, ())}
            if kept:
                wanted[name] = kept
        return wanted

    def propose_defaults(self, agreed: AgreedDefaults) -> None:
        """From any thread: route requests naming no version as `agreed` says from `agreed.at` on. The versions it
        names are not retired while it (or the agreement in force) still routes to them."""
        self._proposed = agreed

    def follow_agreement(self) -> None:
        """On the loop: take the proposed defaults once their instant has come (at the first request after it, or at
        the instant itself, scheduled by the worker)."""
        proposed = self._proposed
        if proposed is None or proposed is self._agreed:
            return
        if self._agreed is not None and time.monotonic() < proposed.at:
            return  # the first agreement applies at once: before it, every worker routed alike, by its own choice
        self._agreed = proposed
        self._choose_defaults()
        self.observer.on_changed(self)

    def _agreed_elsewhere(self, name: str, version: str) -> bool:
        """Whether the workers' agreement (in force or proposed) routes requests naming no version of `name` to
        another version than `version`: a worker started again after a canary's promotion starts no trial."""
        return any(
            agreed is not None and agreed.defaults.get(name, version) != version
            for agreed in (self._agreed, self._proposed)
        )

    def _held(self, name: str, version: str) -> bool:
        """Whether the workers' agreement (in force or proposed) still routes requests naming no version here."""
        return any(
            agreed is not None and agreed.defaults.get(name) == version for agreed in (self._agreed, self._proposed)
        )

    def settings(self, name: str | None) -> ModelSettings:
        """The model's own settings from its config.pbtxt (none for a single model file: the flags decide)."""
        return self._settings.get(name or "", ModelSettings())

    def model_ready(self, name: str, version: str = "") -> bool:
        try:
            self.resolve(name, version)
        except (NotFound, NotReady, ShuttingDown):
            return False
        return True

    # --- lifecycle ----------------------------------------------------------------------------------------

    async def load_file(self, path: Path) -> ServedModel:
        """Serve one model file as a one-version repository (`--model`): name and version from its metadata."""
        async with self._lock:
            served = await self._add(None, None, path, signature(path))
        if served is None:
            raise NotReady(f"the model {path} cannot be served: {self._status[('?', '?')].reason}")
        return served

    async def poll(self, only: str | None = None, settle: bool = True) -> None:
        """Bring what is served in line with the repository folder: load new and changed versions (each READY
        before it takes traffic), move defaults, then retire what the folder no longer wants. With `settle`, a
        file seen changing is loaded only once it holds still for a poll (a copy still being written)."""
        if self.root is None:
            return
        async with self._lock:
            await self._poll(only, settle)

    async def _poll(self, only: str | None, settle: bool) -> None:
        try:
            specs = await asyncio.get_running_loop().run_in_executor(None, scan_repository, self.root)
        except OSError as err:
            log.error("cannot read the model repository %s: %s", self.root, err)
            return
        first = not self._polled
        self._polled = True
        for name, spec in specs.items():
            if (only is not None and name != only) or name in self._unloaded:
                continue
            if spec.problem:
                if self._status.get((name, "")) != VersionStatus(name, "", FAILED, spec.problem):
                    self._fail(name, "", spec.problem)  # said once, not at every poll
                continue
            self._status.pop((name, ""), None)
            self._wanted_default[name] = spec.default_version
            self._wanted_versions[name] = set(spec.versions)
            self._settings[name] = spec.settings
            if spec.canary is not None:
                self._canary_settings[name] = spec.canary
            else:
                self._canary_settings.pop(name, None)
            self._present[name] = set(spec.present)
            for key in [k for k in self._rolled_back if k[0] == name and k[1] not in spec.rolled_back]:
                del self._rolled_back[key]  # its marker was deleted: the operator asks for another trial
                if self._status.get(key, VersionStatus(*key, READY)).state == ROLLED_BACK:
                    del self._status[key]
            for version, why in spec.rolled_back.items():
                if version not in self._served.get(name, {}):
                    self._status[(name, version)] = VersionStatus(name, version, ROLLED_BACK, why)
            for key in [k for k in self._status if k[0] == name and k[1] and k[1] not in spec.present]:
                if self._status[key].state in (FAILED, ROLLED_BACK):  # its folder is gone: so is its verdict
                    del self._status[key]
                    self._failed.pop(key, None)
                    self._rolled_back.pop(key, None)
            for version, path in sorted(spec.versions.items(), key=lambda item: version_key(item[0])):
                try:  # a changed file, or changed settings in config.pbtxt, loads the version again
                    state = (*signature(path), spec.settings)
                except OSError:
                    continue  # removed meanwhile
                current = self._served.get(name, {}).get(version)
                if current is not None and current.signature == state:
                    continue
                if self._failed.get((name, version)) == state or self._rolled_back.get((name, version)) == state:
                    continue
                if settle and not first and self._seen.get((name, version)) != state:
                    self._seen[(name, version)] = state  # still being written? loaded once it holds still a poll
                    continue
                await self._add(name, version, path, state)
        for name, versions in list(self._served.items()):
            if only is not None and name != only:
                continue
            spec = specs.get(name)
            if spec is not None and spec.problem:
                continue  # a broken config.pbtxt: keep serving what was loaded
            wanted = spec.versions if spec is not None else {}
            if wanted and not any(version in versions for version in wanted):
                continue  # none of the versions the policy wants could be loaded: the old ones keep serving
            for version in list(versions):
                on_trial = self._on_trial(name, version) and version in self._present.get(name, ())
                if version not in wanted and not self._held(name, version) and not on_trial:
                    self._retire(versions[version])
        for key in [k for k in self._status if k[0] not in specs]:
            self._status.pop(key)
        if only is None:
            for name in [name for name in self._wanted_versions if name not in specs]:
                del self._wanted_versions[name]  # its folder is gone
        self._choose_defaults()
        self.observer.on_changed(self)

    async def load_model(self, name: str) -> None:
        """An operator's explicit load (or reload) of one model from the repository; NotFound naming why when no
        version of it could be loaded, or when one it asked for failed."""
        folder = self._model_folder(name)
        async with self._lock:
            self._unloaded.discard(name)
            if self._status.get((name, ""), VersionStatus(name, "", READY)).state == UNAVAILABLE:
                del self._status[(name, "")]
            for key in [k for k in self._failed if k[0] == name]:
                del self._failed[key]  # an explicit load tries again even an unchanged file
            if not folder.is_dir():
                raise NotFound(f"no model folder '{name}' in the repository")
            await self._poll(name, settle=False)
        failed = [s for s in self.statuses() if s.name == name and s.reason and s.state in (FAILED, READY)]
        if name not in self._served or failed:
            reason = failed[0].reason if failed else "no version folder with a model.onnx"
            raise NotFound(f"model '{name}' could not be loaded: {reason}")

    def _model_folder(self, name: str) -> Path:
        if self.root is None:
            raise NotFound("this server serves one model file, not a repository: nothing to load or unload")
        if not name or name.startswith(".") or "/" in name or "\\" in name:
            raise InvalidInput(f"{name!r} is not a model name: a model is a folder directly under the repository")
        return self.root / name

    async def unload_model(self, name: str) -> None:
        """An operator's explicit unload of every version of a model; polling leaves it unloaded until loaded."""
        self._model_folder(name)
        async with self._lock:
            if name not in self._served:
                raise NotFound(f"no model named '{name}' is loaded; loaded: {_names(self._served)}")
            self._unloaded.add(name)
            for served in list(self._served[name].values()):
                self._retire(served)
            self._status[(name, "")] = VersionStatus(name, "", UNAVAILABLE, "unloaded by an operator")
            self._choose_defaults()
            self.observer.on_changed(self)

    async def watch(self, interval: float, offset: float = 0.0) -> None:
        """Poll the repository folder every `interval` seconds until cancelled, the first time `offset` seconds later
        (the workers of one host poll the shared folder in turn, not all at once)."""
        await asyncio.sleep(offset)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.poll()
            except Exception:  # a bug here must not stop the watching
                log.exception("polling the model repository failed")

    async def close(self, grace: float = 0.0) -> None:
        """Stop routing, let requests holding versions finish within `grace`, close every pipeline."""
        self.closed = True
        for served in self.served():
            self._retire(served, grace)
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)

    # --- inside ---------------------------------------------------------------------------------------------

    async def _add(self, name: str | None, version: str | None, path: Path, state: VersionState) -> ServedModel | None:
        """Load, verify and warm one version, then route requests to it; None (and FAILED) if it cannot be."""
        label = (name or "?", version or "?")
        if name is not None:
            self._status[(name, version)] = VersionStatus(name, version, LOADING)
            self.observer.on_changed(self)
        started = time.perf_counter()
        try:
            pipeline = await self._load(name, version, path)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # anything a model file can do wrong: it never takes traffic
            reason = str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"
            self._fail(*label, reason, state)
            return None
        seconds = time.perf_counter() - started
        name, version = pipeline.name, pipeline.version
        served = ServedModel(name, version, pipeline, path, state, seconds)
        previous = self._served.setdefault(name, {}).get(version)
        self._served[name][version] = served  # from here on, requests reach it
        self._ever_served = True
        self._status.pop((name, version), None)
        self._failed.pop((name, version), None)
        self._decided.pop((name, version), None)  # a new file under this number: a trial of its own
        self._rolled_back.pop((name, version), None)
        if previous is not None:
            self._retire(previous)  # the same version number with a new file: the old one drains
        self._choose_defaults()
        log.info("model %s version %s READY (load, verification and warm-up %.2f s)", name, version, seconds)
        self.observer.on_loaded(name, version, seconds)
        self.observer.on_changed(self)
        return served

    def _fail(self, name: str, version: str, reason: str, state: VersionState | None = None) -> None:
        log.error("model %s version %s cannot be served: %s", name, version or "(all)", reason)
        self._status[(name, version)] = VersionStatus(name, version, FAILED, reason)
        if state is not None:
            self._failed[(name, version)] = state
        self.observer.on_failed(name, version, reason)
        self.observer.on_changed(self)

    def _choose_defaults(self) -> None:
        for name in list(self._defaults):
            if name not in self._served:
                del self._defaults[name]
        agreed = self._agreed.defaults if self._agreed is not None else {}
        for name, versions in self._served.items():
            previous = self._defaults.get(name, "")
            local = self._canary_default(name, versions, previous, self._local_default(name, versions))
            chosen = agreed.get(name, "")  # under a supervisor, its agreement moves the defaults
            self._defaults[name] = chosen if chosen in versions else local
        for name in [name for name in self._canaries if name not in self._served]:
            del self._canaries[name]
        self._publish_trials()

    # --- canaries (server/models/canary.py) ---------------------------------------------------------------

    def _canary_default(self, name: str, versions: dict[str, ServedModel], previous: str, newest: str) -> str:
        """The default while a canary runs (its stable version); a canary starts when a newer version would replace
        the default of a model whose config.pbtxt asks for one."""
        canary = self._canaries.get(name)
        settings = self._canary_settings.get(name)
        if canary is not None:
            present = self._present.get(name, {canary.stable, canary.candidate}) if self.root else versions
            ended = (
                "a version of the trial is gone"
                if not {canary.stable, canary.candidate} <= (set(versions) & set(present))
                else "the canary settings were removed"
                if settings is None
                else "a default_version was pinned"
                if self._wanted_default.get(name)
                else "the workers' agreement routes to another version (the trial was decided without this worker)"
                if self._agreed_elsewhere(name, canary.stable)
                else ""
            )
            if not ended:
                canary.settings = settings
                return canary.stable
            del self._canaries[name]
            log.warning("model %s: canary of version %s ended undecided: %s", name, canary.candidate, ended)
            self.observer.on_canary(name, canary.candidate, "ENDED", ended)
            return newest
        if (
            settings is None
            or previous not in versions
            or newest == previous
            or self._wanted_default.get(name)  # the operator pinned a default: no trial
            or self._agreed_elsewhere(name, previous)  # the other workers route elsewhere: decided already
            or (name, newest) in self._decided
            or version_key(newest) < version_key(previous)
        ):
            return newest
        canary = Canary(name, previous, newest, settings)
        self._canaries[name] = canary
        log.info("model %s: %s", name, canary.describe())
        self.observer.on_canary(name, newest, "STARTED", canary.describe())
        return previous

    def _publish_trials(self) -> None:
        """`trials_now`, read by the worker's link thread for its supervisor: a new dict, so a reader never sees one
        change under it."""
        self.trials_now = {
            name: {
                "stable": c.stable,
                "candidate": c.candidate,
                "labelled": dict(c.labelled),
                "right": dict(c.right),
                "share": c.settings.share,
                "min_labels": c.settings.min_labels,
                "margin": c.settings.margin,
            }
            for name, c in self._canaries.items()
        }

    def _on_trial(self, name: str, version: str) -> bool:
        canary = self._canaries.get(name)
        return canary is not None and version in (canary.stable, canary.candidate)

    def observe_label(self, name: str, version: str, correct: bool) -> None:
        """A labelled answer (the Feedback call): counted for a running canary, which may decide on it (alone; under
        a supervisor, the supervisor decides on every worker's counts)."""
        canary = self._canaries.get(name)
        if canary is None or version not in (canary.stable, canary.candidate):
            return
        canary.observe(version, correct)
        self._publish_trials()
        decided = canary.decision() if self.trials_judged_here else None
        if decided is not None:
            self._conclude(name, canary.stable, canary.candidate, *decided)

    def conclude_trial(self, name: str, candidate: str, verdict: str, why: str) -> None:
        """The supervisor's verdict on `candidate`, from every worker's labels; also taken by a worker started again
        since the trial began (it runs no trial of its own, but must not serve a version rolled back)."""
        if (name, candidate) in self._decided or verdict not in (PROMOTED, ROLLED_BACK):
            return
        canary = self._canaries.get(name)
        stable = canary.stable if canary is not None and canary.candidate == candidate else ""
        self._conclude(name, stable, candidate, verdict, why)

    def _conclude(self, name: str, stable_version: str, candidate_version: str, verdict: str, why: str) -> None:
        canary = self._canaries.get(name)
        if canary is not None and canary.candidate == candidate_version:
            del self._canaries[name]
        self._decided[(name, candidate_version)] = (verdict, why)
        versions = self._served.get(name, {})
        if verdict == PROMOTED:
            if candidate_version in versions:
                self._defaults[name] = candidate_version
            stable = versions.get(stable_version)
            unwanted = self.root is not None and stable_version not in self._wanted_versions.get(name, ())
            if stable is not None and unwanted and not self._held(name, stable_version):
                self._retire(stable)  # the policy no longer wants it: it was kept for the trial only (under a
                # supervisor, a poll retires it once the workers' agreement has moved to the new one)
        else:
            candidate = versions.get(candidate_version)
            self._status[(name, candidate_version)] = VersionStatus(name, candidate_version, ROLLED_BACK, why)
            if candidate is not None:
                self._rolled_back[(name, candidate_version)] = candidate.signature
                self._retire(candidate)
                try:  # the verdict outlives this process: a restart or another replica does not serve it again
                    (candidate.path.parent / ROLLED_BACK_FILE).write_text(why + "\n")
                except OSError as err:
                    log.warning(
                        "model %s version %s: cannot keep the rollback in its folder (%s): a restart will try it again",
                        name,
                        candidate_version,
                        err,
                    )
        log.info("model %s version %s %s after a canary: %s", name, candidate_version, verdict.lower(), why)
        self.observer.on_canary(name, candidate_version, verdict, why)
        self._choose_defaults()
        self.observer.on_changed(self)

    def _local_default(self, name: str, versions: dict[str, ServedModel]) -> str:
        wanted = self._wanted_default.get(name, "")
        if wanted and wanted not in versions and (name, wanted) not in self._warned_default:
            self._warned_default.add((name, wanted))
            log.warning("model %s: default_version %s is not READY; using the newest", name, wanted)
        return wanted if wanted in versions else max(versions, key=version_key)

    def _retire(self, served: ServedModel, grace: float | None = None) -> None:
        """Take a version out of routing now; close it once the requests holding it are done."""
        versions = self._served.get(served.name, {})
        if versions.get(served.version) is served:
            del versions[served.version]
            if not versions:
                del self._served[served.name]
            self._status.setdefault(
                (served.name, served.version), VersionStatus(served.name, served.version, UNLOADING)
            )
        served.retired = True
        if served.leases == 0:
            served.drained.set()
        task = asyncio.ensure_future(self._close(served, self.grace if grace is None else grace))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _close(self, served: ServedModel, grace: float) -> None:
        try:
            await asyncio.wait_for(served.drained.wait(), grace)
        except TimeoutError:
            if grace:
                log.warning("%s %s: requests still running after %.1f s", served.name, served.version, grace)
        await served.pipeline.close(timeout=grace)
        status = self._status.get((served.name, served.version))
        if status is not None and status.state == UNLOADING:
            del self._status[(served.name, served.version)]
        log.info("model %s version %s unloaded", served.name, served.version)
        if served.version not in self._served.get(served.name, {}):  # not replaced by a new file of the same number
            self.observer.on_unloaded(served.name, served.version)
        self.observer.on_changed(self)


# Stored digits every version must read right before it takes traffic (server/samples: drawn, photographed,
# transparent), through the same preprocessing as requests: a file that loads but computes nonsense is refused.
SAMPLES = Path(__file__).resolve().parents[1] / "samples"
PARITY_SAMPLES = {"zero.png": 0, "two.jpg": 2, "four-transparent.png": 4, "seven.png": 7}


async def verify_on_samples(pipeline: ModelPipeline) -> None:
    """ValueError naming what is wrong unless the pipeline reads every stored digit right, with probabilities that
    sum to 1. The null engines (benchmarking aids: no model) are not checked."""
    if pipeline.info.engine.startswith("null"):
        return
    payloads = [(SAMPLES / name).read_bytes() for name in PARITY_SAMPLES]
    predictions = await pipeline.classify(payloads, [ENCODED] * len(payloads))
    sums = predictions.probabilities.sum(axis=1)
    if not np.all(np.isfinite(predictions.probabilities)) or np.abs(sums - 1).max() > 1e-3:
        raise ValueError(f"verification failed: probabilities are not finite or do not sum to 1 (sums {sums})")
    wrong = [
        f"{name} read as {digit} (expected {label})"
        for (name, label), digit in zip(PARITY_SAMPLES.items(), predictions.digits.tolist(), strict=True)
        if digit != label
    ]
    if wrong:
        raise ValueError(f"verification on stored digits failed: {'; '.join(wrong)}")


def _names(table: dict[str, object]) -> str:
    return ", ".join(f"'{key}'" for key in sorted(table, key=version_key)) or "none"
