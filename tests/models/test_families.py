"""Every row of slimgpt.models.families.FAMILIES says true things about a tiny model of its family.

The exporters (slimgpt.export) and the slim model classes read only these rows, so a wrong fact here
is a wrong export; the remote-code files, which must run without slimgpt, are checked against the rows.
"""

from __future__ import annotations

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

import slimgpt.export.remote.configuration_slimgpt as remote_config
import slimgpt.export.remote.modeling_slimgpt as remote_modeling
import slimgpt.models.slim as slim
from conftest import make_model
from slimgpt.errors import UnsupportedModelError
from slimgpt.export.checkpoint import family_of
from slimgpt.models.adapters import LlamaLikeAdapter
from slimgpt.models.families import FAMILIES, Family, get_adapter

ROWS = list(FAMILIES.values())
BIAS_GROUPS = ("qkv", "o", "ffn_in", "ffn_out")


def _id(row: Family) -> str:
    return row.model_type


@pytest.mark.parametrize("row", ROWS, ids=_id)
def test_classes_build_the_family(row: Family) -> None:
    model = make_model(row.model_type)
    assert isinstance(model, row.model_class)
    assert isinstance(model.config, row.config_class)
    assert type(model).__name__ == row.stock_architecture
    assert model.config.model_type == row.model_type
    assert isinstance(get_adapter(model.config), row.adapter)
    assert row.llama_like == issubclass(row.adapter, LlamaLikeAdapter)


@pytest.mark.parametrize("row", ROWS, ids=_id)
def test_tensor_names_are_the_layer_parameters(row: Family) -> None:
    model = make_model(row.model_type)
    keys = set(model.state_dict())
    for index in range(model.config.num_hidden_layers):
        prefix = row.layer_prefix.format(index)
        for role, name in row.tensor_names.items():
            assert f"{prefix}{name}.weight" in keys, role
        modules = {key.removeprefix(prefix).rpartition(".")[0] for key in keys if key.startswith(prefix)}
        assert modules == set(row.tensor_names.values())  # every layer tensor has a role
    assert set(row.ffn_input_roles) <= set(row.tensor_names)


@pytest.mark.parametrize("row", ROWS, ids=_id)
def test_config_keys(row: Family) -> None:
    model = make_model(row.model_type)
    config = model.config
    values = config.to_dict()
    adapter = get_adapter(config)
    layer = adapter.decoder_layers(model)[0]
    assert values[row.ffn_size_key] == adapter.layer_sizes(layer).ffn_dim
    assert row.kv_heads_key == ("num_key_value_heads" in values)
    if row.head_dim_key:
        assert row.config_class(head_dim=8).head_dim == 8
    else:
        assert "head_dim" not in values
    stock = row.config_class()
    assert row.window_by_default == (hasattr(stock, "sliding_window") and not hasattr(stock, "use_sliding_window"))


@pytest.mark.parametrize("row", ROWS, ids=_id)
def test_stock_biases_are_what_the_stock_class_builds(row: Family) -> None:
    model = make_model(row.model_type)
    adapter = get_adapter(model.config)
    layer = adapter.decoder_layers(model)[0]
    q, _, _ = adapter.attn_inputs(layer)
    built = (q.bias is not None, adapter.attn_output(layer).bias is not None,
             adapter.mlp_inputs(layer)[0].bias is not None, adapter.mlp_output(layer).bias is not None)
    biases = row.biases
    if biases.fixed is not None:
        assert built == biases.fixed
        assert biases.fallback in FAMILIES and FAMILIES[biases.fallback].biases.fixed is None
    else:
        stock = row.config_class()
        assert all(hasattr(stock, key) for key in biases.switches), BIAS_GROUPS
        assert all(getattr(stock, key) == biases.switch_default for key in biases.switches)
        assert built == tuple(bool(getattr(model.config, key)) for key in biases.switches)


@pytest.mark.parametrize("row", ROWS, ids=_id)
def test_slim_classes_are_registered(row: Family) -> None:
    config_name, model_name = row.slim_class_names
    config_cls, model_cls = slim.SLIM_CLASSES[row.model_type]
    assert (config_cls.__name__, model_cls.__name__) == (config_name, model_name)
    assert config_cls.model_type == row.slim_model_type
    assert type(AutoConfig.for_model(row.slim_model_type)) is config_cls
    dense = make_model(row.model_type)
    sizes = [get_adapter(dense.config).layer_sizes(layer) for layer in get_adapter(dense.config).decoder_layers(dense)]
    config = slim.slim_config_from(dense.config, sizes)
    assert type(AutoModelForCausalLM.from_config(config)) is model_cls


@pytest.mark.parametrize("row", ROWS, ids=_id)
def test_remote_code_matches_the_row(row: Family) -> None:
    """The standalone remote-code files carry their own copy of the family facts; they must agree."""
    config_name, model_name = row.slim_class_names
    assert getattr(remote_config, config_name).model_type == row.slim_model_type
    model_cls = getattr(remote_modeling, model_name)
    assert model_cls.config_class is getattr(remote_config, config_name)
    assert issubclass(model_cls, row.model_class)
    is_opt = row.slim_model_type.endswith("opt")  # how modeling_slimgpt.apply_layer_widths tells them apart
    paths, ffn_in = ((remote_modeling.OPT_PATHS, remote_modeling.OPT_FFN_IN) if is_opt
                     else (remote_modeling.LLAMA_PATHS, remote_modeling.LLAMA_FFN_IN))
    names = row.tensor_names
    assert paths == {"q": names["q"], "k": names["k"], "v": names["v"], "o": names["o"], "ffn_out": names["down"]}
    assert ffn_in == tuple(names[role] for role in row.ffn_input_roles)


def test_export_refusal_lists_every_row() -> None:
    with pytest.raises(UnsupportedModelError, match="cannot be exported") as error:
        family_of({"model_type": "gpt2"})
    assert str(error.value).endswith(f"slimgpt exports {', '.join(FAMILIES)}")
    assert all(family_of({"model_type": row.slim_model_type}) == row.model_type for row in ROWS)
