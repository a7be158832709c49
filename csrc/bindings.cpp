// Schemas of the attnserve ops (docs/design.md section 4). Kernels register per device:
// csrc/cpu/*.cpp with TORCH_LIBRARY_IMPL(attnserve, CPU, m), csrc/cuda/binding.cpp with
// TORCH_LIBRARY_IMPL(attnserve, CUDA, m). Fake (meta) kernels live in strategies/ops.py.
//
// Shapes: B sequences, Hq query heads, Hkv KV heads, G = Hq / Hkv, D head size.
// key_cache / value_cache: [num_blocks, Hkv, page, D], last dim contiguous (CPU: or the token dim,
// as in vLLM's CPU K), other strides free.
// Index tensors are int32. Padding past num_idx in token_idx / sel_idx is 0 (mass: 0).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(attnserve, m) {
  // -> (out [B, Hq, D] query dtype, mass [B, Hkv, K] fp32, or [0] when !want_mass)
  m.def(
      "sparse_paged_attention(Tensor query, Tensor key_cache, Tensor value_cache, "
      "Tensor block_table, Tensor token_idx, Tensor num_idx, float scale, bool want_mass) "
      "-> (Tensor, Tensor)");
  // -> out [T, Hq, D] query dtype
  m.def(
      "paged_prefill_attention(Tensor query, Tensor key_cache, Tensor value_cache, "
      "Tensor block_table, Tensor query_start_loc, Tensor seq_lens, float scale, int n_sink, "
      "int window, Tensor? block_mask, int mask_block) -> Tensor");
  // kmin / kmax [num_blocks, Hkv, page / chunk, D] fp32 (CPU also bf16, or int8 rows [.., D + 4]: D steps
  // then their fp32 scale), updated in place
  m.def(
      "landmark_update_summaries(Tensor key_cache, Tensor block_table, Tensor start_pos, "
      "Tensor seq_lens, int chunk, Tensor(a!) kmin, Tensor(b!) kmax) -> ()");
  // -> (token_idx [B, Hkv, K], num_idx [B, Hkv]), K = min((k_chunks + 2) * chunk, MB * page);
  // group_max: a chunk's score for a KV head is the max of its query heads' bounds, else their sum
  m.def(
      "landmark_select(Tensor query, Tensor kmin, Tensor kmax, Tensor block_table, "
      "Tensor seq_lens, int chunk, int k_chunks, bool group_max=False) -> (Tensor, Tensor)");
  // pooled [num_blocks, Hkv, page / pool, 3 * D] fp32 = (max, min, mean), updated in place
  m.def(
      "seer_pool_keys(Tensor key_cache, Tensor block_table, Tensor start_pos, Tensor seq_lens, "
      "int pool, Tensor(a!) pooled) -> ()");
  // -> (token_idx [B, Hkv, K], num_idx [B, Hkv], probs [B, Hkv, NB] fp32),
  //    K = NB * pool if top_k <= 0 else min(top_k + 1, NB) * pool
  m.def(
      "seer_select(Tensor q_gate, Tensor k_gate, Tensor num_blocks, int pool, Tensor seq_lens, "
      "float threshold, int top_k) -> (Tensor, Tensor, Tensor)");
  // -> (sel_idx [B, Hkv, k], sel_num [B, Hkv])
  m.def(
      "topk_from_mass(Tensor mass, Tensor token_idx, Tensor num_idx, int k) -> (Tensor, Tensor)");
  // dst_key / dst_value [P, Hkv, dpage, D] (cache dtype), updated in place: for i < num_idx[b, g],
  // token token_idx[b, g, i] -> slot dst_start[b] + i of dst_block_table[b] (Recycled Attention)
  m.def(
      "gather_kv(Tensor key_cache, Tensor value_cache, Tensor block_table, Tensor token_idx, "
      "Tensor num_idx, Tensor dst_block_table, Tensor dst_start, Tensor(a!) dst_key, "
      "Tensor(b!) dst_value) -> ()");
}

namespace attnserve {
int64_t parallel_grain();
int64_t set_parallel_grain(int64_t value);
const char* cpu_isa_name();
const char* set_isa_cap(const char* name);
}  // namespace attnserve

namespace {

// set_parallel_grain(n) -> previous grain; n < 0 only reads it (csrc/cpu/common.h threads_for).
PyObject* set_parallel_grain(PyObject*, PyObject* arg) {
  const long long value = PyLong_AsLongLong(arg);
  if (value == -1 && PyErr_Occurred()) return nullptr;
  const int64_t previous =
      value < 0 ? attnserve::parallel_grain() : attnserve::set_parallel_grain(value);
  return PyLong_FromLongLong(previous);
}

// cpu_isa() -> the ISA level the CPU kernels use now.
PyObject* cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(attnserve::cpu_isa_name()); }

// set_cpu_isa_cap(name) -> previous cap (csrc/cpu/common.h cpu_isa).
PyObject* set_cpu_isa_cap(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  const char* previous = attnserve::set_isa_cap(name);
  if (previous == nullptr) {
    PyErr_Format(PyExc_ValueError, "unknown ISA %R: one of 'default', 'avx2', 'avx512', 'avx512bf16'", arg);
    return nullptr;
  }
  return PyUnicode_FromString(previous);
}

PyMethodDef module_methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "cpu_isa() -> the ISA level the CPU kernels use now."},
    {"set_cpu_isa_cap", set_cpu_isa_cap, METH_O,
     "set_cpu_isa_cap(name) -> previous cap: the CPU kernels use at most this ISA level ('default', "
     "'avx2', 'avx512', 'avx512bf16'; the CPU's own level when it is lower)."},
    {"set_parallel_grain", set_parallel_grain, METH_O,
     "set_parallel_grain(n) -> previous: CPU ops whose work (~multiply-adds) is below n run on one "
     "thread; n < 0 returns the current grain unchanged."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// `import strategies._C` loads this library, which registers the ops above.
static struct PyModuleDef attnserve_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                              module_methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&attnserve_module); }
