"""For Megatron-LM's ``--spec`` flag: ``pretrain_gpt.py ... --spec trilemma_moe.integrations.megatron_spec layer_spec``.

Megatron-LM imports ``layer_spec`` from this module (``megatron.core.transformer.spec_utils.import_module``:
the attribute itself, not called) inside its model provider, after ``initialize_megatron``, and
passes it to ``GPTModel`` as the transformer-layer spec. So the spec is built here at import,
from Megatron-LM's parsed arguments (``megatron.training.get_args``, which megatron-core alone
does not ship); our other knobs come from the YAML file named by ``TRILEMMA_MOE_CONFIG``. See
``megatron.spec_for_megatron_lm``.
"""
from megatron.training import get_args
from megatron.training.arguments import core_transformer_config_from_args

from .megatron import spec_for_megatron_lm

layer_spec = spec_for_megatron_lm(get_args(), core_transformer_config_from_args(get_args()))
