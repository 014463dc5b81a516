"""`vispec_vllm.patches._wrap.wrap`: the one way every patch replaces a vLLM function."""

from __future__ import annotations

import types

import pytest
from vispec_vllm.patches._wrap import is_wrapped, original_of, wrap


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
    wrap(owner, "static", counting_wrapper(calls))
    assert isinstance(vars(owner)["static"], staticmethod)
    assert owner.static(4) == 40 and owner(0).static(5) == 50  # via the class and via an instance
    assert calls == [4, 5]
    assert original_of(owner, "static") is unpatched


def test_classmethod_stays_class_bound():
    owner, calls = make_owner(), []
    unpatched = vars(owner)["make"].__func__
    wrap(owner, "make", counting_wrapper(calls))
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
    with pytest.raises(AttributeError, match="no_such_method"):
        wrap(owner, "no_such_method", lambda original: original)


def test_every_patch_is_idempotent_on_vllm():
    """Applying every patch twice installs each replacement once (vLLM calls register() per process)."""
    from vispec_vllm.patches import cpu_sampling_fallbacks
    from vllm.config.speculative import SpeculativeConfig
    from vllm.config.vllm import VllmConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.multimodal.media.image import ImageMediaIO
    from vllm.utils import cpu_triton_utils
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.output_processor import OutputProcessor
    from vllm.v1.metrics.loggers import PrometheusStatLogger
    from vllm.v1.spec_decode.eagle import EagleProposer

    from vispec_vllm.registration import register_with_vllm

    register_with_vllm()
    patched = [(SpeculativeConfig, "__post_init__"), (EagleProposer, "__new__"),
               (VllmConfig, "_get_v2_model_runner_unsupported_features"), (EngineArgs, "add_cli_args"),
               (EngineArgs, "from_cli_args"), (ImageMediaIO, "load_bytes"), (OutputProcessor, "add_request"),
               (OutputProcessor, "_finish_request"), (Scheduler, "__init__"), (Scheduler, "make_spec_decoding_stats")]
    patched += [(Scheduler, "update_from_output"), (Scheduler, "make_stats"), (PrometheusStatLogger, "record")]
    if cpu_sampling_fallbacks.applies():  # vLLM's CPU platform without Triton
        patched.append((cpu_triton_utils, "_expand_kernel_impl"))
    installed = {(owner, name): vars(owner)[name] for owner, name in patched}
    assert all(is_wrapped(owner, name) for owner, name in patched)
    register_with_vllm()
    assert {(owner, name): vars(owner)[name] for owner, name in patched} == installed
    # Nothing wraps a replacement: each original is vLLM's own function.
    for owner, name in patched:
        assert not hasattr(original_of(owner, name), "__vispec_original__"), (owner, name)
    assert isinstance(vars(EngineArgs)["add_cli_args"], staticmethod)
    assert isinstance(vars(EngineArgs)["from_cli_args"], classmethod)
