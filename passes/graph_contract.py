"""What the pass requires of the graphs transformers' models give Dynamo: the contract, in one place.

The pass reads code it does not own. Every release of transformers may rename a module, wrap a
function in a hub kernel or move a graph break; the pass then either still finds what it needs or
refuses the graph (compiled unchanged, one warning). This list is everything it still relies on;
each item names where the pass reads it and the test that checks it on the installed transformers
(`tests/test_graph_contract.py` runs across the families; CI's main leg runs the newest release
the project allows, its compatibility leg the oldest). Where a fact could be read from the data
flow instead of a name, it is; the names left are the module paths of the decoder's layers and
final norm, and the image merge's method.

When transformers breaks an item, fix the reading here (and in the module the item names), not
in the family modules: they only state names.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ContractItem:
    key: str
    requires: str  # what the graph must show
    read_by: str  # where the pass reads it
    test: str  # "tests/<file>.py::<test function>" that checks it


GRAPH_CONTRACT: tuple[ContractItem, ...] = (
    ContractItem(
        "module-tree",
        "Every node a decoder layer computes has `<decoder>.layers.<N>` on the chain of its "
        "`nn_module_stack` in which each entry extends the one before; entries off that chain "
        "(modules called from outside the model's tree, e.g. hub-kernel function wrappers "
        "`G['...'].apply_rotary_pos_emb`) are skipped.",
        "passes/layout.py: module_path, DecoderLayout.layer_index / in_layer_scope",
        "tests/test_graph_contract.py::test_module_tree",
    ),
    ContractItem(
        "one-sdpa-per-layer",
        "Each decoder layer attends through exactly one `scaled_dot_product_attention(q, k, v, "
        "attn_mask, dropout_p=0, is_causal, scale)` call (attn_implementation='sdpa'): q [B, H, S, D] "
        "after RoPE, k and v [B, H or Hkv, S_kv, D], the mask a tensor or None.",
        "passes/locate.py: locate_decoder, _sdpa_args",
        "tests/test_graph_contract.py::test_one_sdpa_per_layer",
    ),
    ContractItem(
        "residual-add",
        "In each layer's own forward, an add takes the attention's output (after o_proj, and any "
        "norm) and a tensor not computed from it: the residual stream entering the layer.",
        "passes/locate.py: _find_residual_add",
        "tests/test_graph_contract.py::test_residual_add",
    ),
    ContractItem(
        "image-merge",
        "The decoder graph holds the image merge (the family's scatter of image features into the "
        "embeddings, `DecoderLayout.merge_methods`, or its `fitprune::visual_token_mark` when a graph "
        "break separates them), and its output is the residual stream entering layer 0.",
        "passes/locate.py: _find_image_merges; families/*: merge_methods / install",
        "tests/test_graph_contract.py::test_image_merge",
    ),
    ContractItem(
        "per-token-inputs",
        "The only tensors made outside the layers, read inside them, and sized by the sequence are "
        "the residual stream, the SDPA masks ([B, 1, S, S]), the rotary tables and the family's "
        "visual residual addends.",
        "passes/locate.py: _per_token_tensors",
        "tests/test_graph_contract.py::test_per_token_inputs",
    ),
    ContractItem(
        "rotary-tables",
        "Rotary cos/sin are [B, S, D], computed from positions (not from the embeddings), and read "
        "inside a layer only on the way to its attention's query and key.",
        "passes/locate.py: _is_rotary_table",
        "tests/test_graph_contract.py::test_rotary_tables",
    ),
    ContractItem(
        "literal-sizes",
        "After a compaction, the sequence length appears only in the size arguments of view / "
        "reshape / expand (a literal or a SymInt); every other op takes its sizes from its inputs.",
        "passes/sequence_length.py: propagate_compaction",
        "tests/test_graph_contract.py::test_literal_sizes",
    ),
    ContractItem(
        "resizable-ops",
        "No opaque kernel downstream of a compaction takes a token-dependent size (a user Triton "
        "kernel's grid, a hub kernel's row count); such a graph is refused.",
        "passes/sequence_length.py: check_resizable",
        "tests/test_graph_contract.py::test_a_kernel_that_bakes_the_row_count_is_refused",
    ),
    ContractItem(
        "cache-writeback",
        "Each layer's KV-cache update is a `cat` in the graph whose result Dynamo writes back into "
        "the cache, so a layer that attends over fewer tokens caches fewer; it is reached from the "
        "attention's key and value through single-input ops of the layer (a batch of different "
        "visual counts fills its void rows there; a write-back not found so keeps the even-count check).",
        "fitprune_fx/pruned_cache.py (module docstring); passes/padded_compaction.py: _cache_concat",
        "tests/test_graph_contract.py::test_cache_writeback",
    ),
    ContractItem(
        "cache-keywords",
        "Each layer's attention calls `cache.update(key, value, layer_idx, kwargs=kwargs)` with the "
        "dict it then splats into the attention function, inside the layer's scope; masks take their "
        "query offset from `Cache.get_seq_length(layer)` (via `get_query_offset`) and their sizes "
        "from `Cache.get_mask_sizes(q, layer)` of the first full / first sliding layer; generation's "
        "cache operations go through the layer methods crop, reorder_cache, batch_repeat_interleave "
        "and batch_select_indices. Without the keywords nothing is recorded: sliding windows are then "
        "refused and other layers fall back to the left-padding cut.",
        "fitprune_fx/positioned_cache.py: install, _update; passes/cache_positions.py",
        "tests/test_graph_contract.py::test_cache_keywords",
    ),
    ContractItem(
        "static-layers",
        "A static cache layer preallocates [B, Hkv, L, D] keys and values (L its `max_cache_len`, the "
        "window's length in a sliding layer) in `lazy_initialization` or the cache's "
        "`early_initialization`, counts tokens in `cumulative_length` (a tensor; sliding layers also "
        "`cumulative_length_int`), writes each call after the slots it holds (a full window rolls "
        "left), and its masks have one column per slot, slot 0 at position max(seen - L, 0). A "
        "pruned prefill writes each kept key at that slot and the validity follows every later "
        "update by running transformers' own update on it.",
        "fitprune_fx/static_cache.py: update, _start, _ValidityLayer, initialize_early",
        "tests/test_static_cache.py::test_validity_moves_with_the_keys_through_transformers_updates",
    ),
    ContractItem(
        "example-counts",
        "The host can read each example's visual count before the decoder graph runs: the family's "
        "`visual_token_mark` carries them as a [B] CPU tensor, or the one merge's bool mask ([B, S] "
        "or [B, S, 1]) is a graph input (LLaVA's image-placeholder check breaks the graph just "
        "before the merge). Without it a batch that mixes visual counts fails the run-time check.",
        "passes/locate.py: locate_decoder, _mask_input; passes/token_count_inputs.py: read_example_counts",
        "tests/test_graph_contract.py::test_example_counts",
    ),
    ContractItem(
        "final-norm",
        "The decoder's final norm runs under `<decoder>.norm` after the last layer.",
        "passes/layout.py: is_final_norm; passes/split_layers.py; backend.check_recipe_fits",
        "tests/test_graph_contract.py::test_final_norm",
    ),
    ContractItem(
        "attention-interface",
        "transformers calls attention through `AttentionInterface['sdpa']`, with the layer's "
        "`sliding_window` as a keyword; `pruned_cache.install` registers its wrapper there.",
        "fitprune_fx/pruned_cache.py: install, pruned_cache_sdpa",
        "tests/test_graph_contract.py::test_attention_interface",
    ),
    ContractItem(
        "maskless-causal",
        "A prefill SDPA given no mask is causal exactly when `is_causal=True` (transformers skips "
        "the mask when nothing is padded, as `generate` does); the pass writes that mask itself "
        "when a batch of different visual counts needs void slots hidden.",
        "passes/causal_mask.py: needs_causal_mask, insert_causal_mask",
        "tests/test_any_visual_count.py::test_a_first_generate_on_equal_length_prompts_of_different_image_sizes",
    ),
    ContractItem(
        "tensor-parallel-heads",
        "Under transformers' tensor parallelism each layer's attention holds a slice of the heads, "
        "and the attention's output projection ends in a `_c10d_functional.all_reduce` over the "
        "tensor-parallel group before the residual add; local heads x the group's size = the "
        "model's heads.",
        "passes/sharded_heads.py: all_reduce_group, head_sharding",
        "tests/test_tensor_parallel.py::test_two_ranks_prune_like_one_process",
    ),
)
