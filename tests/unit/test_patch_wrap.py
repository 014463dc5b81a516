"""`vispec_vllm.patches._wrap.wrap`: the one way every patch replaces a vLLM function."""

from __future__ import annotations

import re
import types
from dataclasses import dataclass, field

import pytest
from vispec_vllm.patches._wrap import INSTALLED, Installed, PatchError, is_wrapped, original_of, wrap


def make_owner():
    """A fresh class with one method of each kind (each test patches its own copy)."""

    class Owner:
        def __init__(self, value: int) -> None:
            self.value = value

        def plain(self, x: int) -> int:
            return self.value + x

        @staticmethod
        def static(x: int) -> int:
            return 10 * x

        @classmethod
        def make(cls, value: int):
            return cls(value)

    return Owner


def counting_wrapper(calls: list):
    """make_replacement whose replacement logs each call and delegates to the original."""

    def make_replacement(original):
        def replacement(*args, **kwargs):
            calls.append(args[-1])
            return original(*args, **kwargs)

        return replacement

    return make_replacement


def test_plain_method_is_wrapped_once():
    owner, calls = make_owner(), []
    unpatched = owner.plain
    installed = wrap(owner, "plain", counting_wrapper(calls))
    again = wrap(owner, "plain", counting_wrapper(calls))  # a second apply() is a no-op
    assert again is installed and owner.plain is installed
    assert owner(1).plain(2) == 3
    assert calls == [2]  # one layer of wrapping, not two
    assert original_of(owner, "plain") is unpatched
    assert is_wrapped(owner, "plain")


def test_staticmethod_stays_static():
    owner, calls = make_owner(), []
    unpatched = owner.static
    wrap(owner, "static", counting_wrapper(calls))
    assert isinstance(vars(owner)["static"], staticmethod)
    assert owner.static(4) == 40 and owner(0).static(5) == 50  # via the class and via an instance
    assert calls == [4, 5]
    assert original_of(owner, "static") is unpatched


def test_classmethod_stays_class_bound():
    owner, calls = make_owner(), []
    unpatched = vars(owner)["make"].__func__
    wrap(owner, "make", counting_wrapper(calls))
    assert isinstance(vars(owner)["make"], classmethod)

    class Child(owner):
        pass

    made = Child.make(7)  # cls is the class it is called on, as before the patch
    assert type(made) is Child and made.value == 7
    assert calls == [7]
    assert original_of(owner, "make") is unpatched


def test_inherited_attribute_is_wrapped_on_the_owner_only():
    base, calls = make_owner(), []

    class Child(base):
        pass

    wrap(Child, "plain", counting_wrapper(calls))
    assert "plain" not in vars(base) or not is_wrapped(base, "plain")
    assert base(1).plain(1) == 2 and calls == []  # the base class is untouched
    assert Child(1).plain(1) == 2 and calls == [1]
    assert original_of(Child, "plain") is vars(base)["plain"]


def test_module_function_and_builtin_new():
    module, calls = types.ModuleType("fake_module"), []
    module.version = lambda name: f"{name}-1.0"
    unpatched = module.version
    wrap(module, "version", counting_wrapper(calls))
    wrap(module, "version", counting_wrapper(calls))
    assert module.version("vllm") == "vllm-1.0" and calls == ["vllm"]
    assert original_of(module, "version") is unpatched

    # EagleProposer.__new__ is inherited from object: the original is object.__new__.
    owner = make_owner()
    wrap(owner, "__new__", lambda original: lambda cls, *args: original(cls))
    assert original_of(owner, "__new__") is object.__new__
    assert owner(3).value == 3


def test_unwrapped_and_missing_names_are_errors():
    owner = make_owner()
    assert not is_wrapped(owner, "plain")
    with pytest.raises(ValueError, match="plain is not wrapped"):
        original_of(owner, "plain")
    # The unit is the module that defines make_replacement: here, this test module.
    with pytest.raises(PatchError, match=r"patch test_patch_wrap .*Owner has no attribute 'no_such_method'"):
        wrap(owner, "no_such_method", lambda original: original)


def test_wrap_records_each_installation_once():
    owner, calls = make_owner(), []
    recorded = len(INSTALLED)
    installed = wrap(owner, "static", counting_wrapper(calls))
    wrap(owner, "static", counting_wrapper(calls))
    (record,) = INSTALLED[recorded:]
    assert (record.owner, record.name, record.replacement) == (owner, "static", installed)
    assert record.unit == __name__ and record.descriptor is staticmethod
    assert record.symbol == f"{__name__}.make_owner.<locals>.Owner.static"

    class Child(owner):
        pass

    wrap(Child, "plain", counting_wrapper(calls))  # inherited: the symbol is where it is defined
    assert INSTALLED[-1].symbol == f"{__name__}.make_owner.<locals>.Owner.plain"


# -- the patch inventory: vispec-vllm's wraps on vLLM, as recorded by `wrap` ----------------------

PLUGIN_LOAD_PROCESSES = ("API server", "engine core", "worker", "any")


@dataclass
class IndexEntry:
    processes: set[str] = field(default_factory=set)
    symbols: set[str] = field(default_factory=set)


def index_entries() -> dict[str, IndexEntry]:
    """Section A of the index in patches/__init__.py, by unit ("serve_flags"): process labels and symbols."""
    import vispec_vllm.patches

    section = vispec_vllm.patches.__doc__.split("\nA. Patched", 1)[1].split("\nB. Subclassed", 1)[0]
    entries: dict[str, IndexEntry] = {}
    for block in section.split("\n\n")[1:]:
        fields = [re.match(r"  (unit|process|symbol) +(\S.*)", line) for line in block.splitlines()]
        fields = [(match[1], match[2]) for match in fields if match]
        (unit_file,) = [value for key, value in fields if key == "unit"]
        entry = entries.setdefault(re.fullmatch(r"patches/(\w+)\.py", unit_file)[1], IndexEntry())
        for key, value in fields:
            if key == "process":
                entry.processes |= {label.strip() for label in re.split(r"[;(]", value)[0].split(",")}
            elif key == "symbol":
                entry.symbols.add(value.split()[0])
    return entries


@pytest.fixture(scope="module")
def vllm_inventory() -> list[Installed]:
    """Every vispec-vllm patch applied here, the way each is applied in vLLM's processes; what `wrap` recorded."""
    from vispec_vllm.patches import cli_version, image_state_metrics
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vispec_vllm.registration import register_with_vllm

    register_with_vllm()  # on plugin load
    cli_version.apply()  # by the `vispec-vllm` command
    # When a ViSpecProposer is built, on its runner's class (here a subclass of our own: vLLM's stay as they are).
    image_state_metrics.apply_to_model_runner(type("RunnerClass", (GPUModelRunner,), {}))
    return [record for record in INSTALLED if record.unit.startswith("vispec_vllm.patches.")]


def test_every_patch_is_idempotent_on_vllm(vllm_inventory):
    """Applying every patch again installs nothing new (vLLM calls register() in every process it starts)."""
    from vispec_vllm.registration import register_with_vllm

    assert vllm_inventory
    recorded = len(INSTALLED)
    register_with_vllm()
    assert len(INSTALLED) == recorded
    for record in vllm_inventory:
        stored = vars(record.owner)[record.name]
        assert getattr(stored, "__func__", stored) is record.replacement, record.symbol
        assert (type(stored) if record.descriptor else None) is record.descriptor, record.symbol
        assert original_of(record.owner, record.name) is record.original, record.symbol
        # Nothing wraps a replacement: each original is vLLM's (or the standard library's) own function.
        assert not hasattr(record.original, "__vispec_original__"), record.symbol
    kinds = {record.symbol: record.descriptor for record in vllm_inventory}
    assert kinds["vllm.engine.arg_utils.EngineArgs.add_cli_args"] is staticmethod
    assert kinds["vllm.engine.arg_utils.EngineArgs.from_cli_args"] is classmethod


def test_the_index_names_every_wrapped_symbol(vllm_inventory):
    from vispec_vllm.patches import cpu_sampling_fallbacks

    index = index_entries()
    for record in vllm_inventory:
        assert record.unit_name in index, f"patches/{record.unit_name}.py has no entry in the index"
        assert record.symbol in index[record.unit_name].symbols, f"the index does not name {record.symbol}"
    # And names nothing that is not wrapped (a unit applied where this platform needs it).
    recorded = {(record.unit_name, record.symbol) for record in vllm_inventory}
    for unit, entry in index.items():
        if unit == "cpu_sampling_fallbacks" and not cpu_sampling_fallbacks.applies():
            continue
        assert {(unit, symbol) for symbol in entry.symbols} <= recorded, unit


def test_registration_applies_the_units_by_the_index_s_process_labels(vllm_inventory):
    from vispec_vllm.registration import PATCH_UNITS_BY_PROCESS

    assert set(PATCH_UNITS_BY_PROCESS) == set(PLUGIN_LOAD_PROCESSES)
    for unit, entry in index_entries().items():
        registered_under = {process for process, units in PATCH_UNITS_BY_PROCESS.items()
                            if any(module.__name__ == f"vispec_vllm.patches.{unit}" for module in units)}
        assert registered_under == entry.processes & set(PLUGIN_LOAD_PROCESSES), unit
    assert {unit for unit, entry in index_entries().items() if not entry.processes & set(PLUGIN_LOAD_PROCESSES)} == {
        "cli_version"}


def test_a_patch_that_cannot_apply_names_itself():
    from vispec_vllm.patches import image_limits

    from vispec_vllm.registration import apply_unit

    class BrokenUnit(types.ModuleType):
        def apply(self) -> None:
            raise ImportError("cannot import name 'ImageMediaIO' from 'vllm.multimodal.media.image'")

    with pytest.raises(PatchError, match=r"^vispec-vllm patch image_limits \(patches/image_limits\.py.*ImportError"):
        apply_unit(BrokenUnit(image_limits.__name__))
