// torch.ops.assistant.decode_attention: attention of one new token over the filled part of a static
// KV cache (decode steps), with the query heads that share a key/value head (grouped-query attention)
// reading each key and value row once. Built and loaded by decode_attention.py.
//
// Why by hand: for one query token PyTorch's CPU SDPA pays ~30 us a layer in fixed costs (bf16 GEMM
// packing and AMX set-up for 3 x L matrices, buffers, an uneven split of 3 heads over 2 threads), more
// than the work itself; this kernel is plain vector arithmetic, split evenly over the threads.
//
// Each (head, span of positions) is one work item giving a partial softmax (its maximum score, the sum
// of exp(score - maximum), and the exp-weighted sum of value rows); the partials of a head are then
// combined exactly (flash-decoding), so the answer does not depend on how the positions were split.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

constexpr int W = 16;  // floats per vector (GCC vector extensions: one AVX-512 register, or two AVX2 ones)
typedef float fvec __attribute__((vector_size(W * 4)));
typedef uint32_t uvec __attribute__((vector_size(W * 4)));
typedef int32_t ivec __attribute__((vector_size(W * 4)));
typedef uint16_t hvec __attribute__((vector_size(W * 2)));

inline fvec load_bf16(const at::BFloat16* p) {  // bf16 is the top half of a float
#ifdef __AVX512F__
  return (fvec)_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
#else
  hvec h;
  std::memcpy(&h, p, sizeof(h));
  return (fvec)(__builtin_convertvector(h, uvec) << 16);
#endif
}

inline void store_bf16(at::BFloat16* p, fvec x) {  // rounded to nearest even, as PyTorch rounds
  uvec u = (uvec)x;
  u = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  hvec h = __builtin_convertvector(u, hvec);
  std::memcpy(p, &h, sizeof(h));
}

inline float hsum(fvec v) {  // a shuffle tree, not 16 dependent scalar additions
  v += __builtin_shuffle(v, ivec{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  v += __builtin_shuffle(v, ivec{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  v += __builtin_shuffle(v, ivec{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  v += __builtin_shuffle(v, ivec{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
  return v[0];
}

// one level of a transpose-and-add tree: each pair of vectors becomes one, each half summing halves
inline void fold(fvec* v, int n, ivec lo, ivec hi) {
  for (int i = 0; i < n; i++)
    v[i] = __builtin_shuffle(v[2 * i], v[2 * i + 1], lo) + __builtin_shuffle(v[2 * i], v[2 * i + 1], hi);
}

// r[j] = the sum of the lanes of v[j], for 16 vectors: 15 additions and 30 shuffles in all
inline fvec hsum16(const fvec* v) {
  static constexpr int order[W] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};  // the tree's lane order
  fvec t[W];
  for (int i = 0; i < W; i++) t[i] = v[order[i]];
  fold(t, 8, ivec{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
       ivec{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31});
  fold(t, 4, ivec{0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
       ivec{4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31});
  fold(t, 2, ivec{0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
       ivec{2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31});
  fold(t, 1, ivec{0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30},
       ivec{1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31});
  return t[0];
}

// The partial softmax of G query rows (query, q_stride apart) over key/value rows [0, n):
// maximum[g], total[g] = sum of exp(score - maximum), acc[g] = sum of exp(score - maximum) * value row
template <int D, int G>
void attend_span(const at::BFloat16* query, int64_t q_stride, float scale, const at::BFloat16* k,
                 const at::BFloat16* v, int64_t row_stride, int64_t n, float* maximum, float* total, float* acc,
                 std::vector<float>& buffer) {
  constexpr int C = D / W;
  fvec q[G][C];  // local, so that the compiler keeps it in registers across positions
  for (int g = 0; g < G; g++)
    for (int c = 0; c < C; c++) q[g][c] = load_bf16(query + g * q_stride + c * W) * scale;
  buffer.resize(G * n);
  float* scores = buffer.data();
  int64_t p = 0;
  for (; p + W <= n; p += W) {  // 16 positions at a time, summed across lanes together
    fvec dots[G][W];
    for (int j = 0; j < W; j++) {
      fvec key[C];
      for (int c = 0; c < C; c++) key[c] = load_bf16(k + (p + j) * row_stride + c * W);
      for (int g = 0; g < G; g++) {
        fvec x = q[g][0] * key[0];
        for (int c = 1; c < C; c++) x += q[g][c] * key[c];
        dots[g][j] = x;
      }
    }
    for (int g = 0; g < G; g++) {
      fvec r = hsum16(dots[g]);
      std::memcpy(scores + g * n + p, &r, sizeof(r));
    }
  }
  for (; p < n; p++) {
    fvec key[C];
    for (int c = 0; c < C; c++) key[c] = load_bf16(k + p * row_stride + c * W);
    for (int g = 0; g < G; g++) {
      fvec x = q[g][0] * key[0];
      for (int c = 1; c < C; c++) x += q[g][c] * key[c];
      scores[g * n + p] = hsum(x);
    }
  }
  for (int g = 0; g < G; g++) {
    float* s = scores + g * n;
    float m = -FLT_MAX;
    for (int64_t i = 0; i < n; i++) m = std::max(m, s[i]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; i++) {
      s[i] = std::exp(s[i] - m);
      sum += s[i];
    }
    maximum[g] = m;
    total[g] = sum;
  }
  fvec out[G][C] = {};
  for (int64_t i = 0; i < n; i++) {
    fvec value[C];
    for (int c = 0; c < C; c++) value[c] = load_bf16(v + i * row_stride + c * W);
    for (int g = 0; g < G; g++) {
      const float w = scores[g * n + i];
      for (int c = 0; c < C; c++) out[g][c] += w * value[c];
    }
  }
  std::memcpy(acc, out, sizeof(out));
}

template <int D, int G>
void decode_attention_kernel(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                             int64_t length, float scale, at::Tensor& out) {
  constexpr int C = D / W;
  const int64_t batch = query.size(0), kv_heads = key.size(1);
  // split each head's positions into spans so that every thread gets about the same work; at least 32
  // positions a span, or the partials cost more than they save
  const int64_t threads = at::get_num_threads();
  const int64_t spans = std::max<int64_t>(1, std::min<int64_t>((2 * threads + kv_heads - 1) / kv_heads, length / 32));
  const int64_t span = (length + spans - 1) / spans;
  const int64_t items = batch * kv_heads * spans;
  std::vector<float> maximum(items * G), total(items * G), acc(items * G * D);
  const auto* q = query.data_ptr<at::BFloat16>();
  const auto* k = key.data_ptr<at::BFloat16>();
  const auto* v = value.data_ptr<at::BFloat16>();
  const int64_t grain = length < 64 ? items : 1;  // short contexts: less work than waking a thread
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> buffer;
    for (int64_t item = begin; item < end; item++) {
      const int64_t b = item / (kv_heads * spans), h = item / spans % kv_heads, s = item % spans;
      const int64_t first = s * span, n = std::min(length, first + span) - first;
      if (n <= 0) {  // an empty span (possible only at the end): contributes nothing
        std::fill_n(maximum.data() + item * G, G, -FLT_MAX);
        std::fill_n(total.data() + item * G, G, 0.f);
        std::fill_n(acc.data() + item * G * D, G * D, 0.f);
        continue;
      }
      const int64_t offset = b * key.stride(0) + h * key.stride(1) + first * key.stride(2);
      attend_span<D, G>(q + b * query.stride(0) + h * G * query.stride(1), query.stride(1), scale, k + offset,
                        v + offset, key.stride(2), n, maximum.data() + item * G, total.data() + item * G,
                        acc.data() + item * G * D, buffer);
    }
  });
  auto* o = out.data_ptr<at::BFloat16>();
  for (int64_t b = 0; b < batch; b++)
    for (int64_t h = 0; h < kv_heads; h++)
      for (int g = 0; g < G; g++) {  // the partials of one head combined: rescaled to the largest maximum
        const int64_t first_item = (b * kv_heads + h) * spans;
        float m = -FLT_MAX;
        for (int64_t s = 0; s < spans; s++) m = std::max(m, maximum[(first_item + s) * G + g]);
        fvec sum[C] = {};
        float denominator = 0.f;
        for (int64_t s = 0; s < spans; s++) {
          const int64_t i = (first_item + s) * G + g;
          if (total[i] == 0.f) continue;
          const float factor = std::exp(maximum[i] - m);
          denominator += factor * total[i];
          for (int c = 0; c < C; c++) {
            fvec part;
            std::memcpy(&part, acc.data() + i * D + c * W, sizeof(part));
            sum[c] += factor * part;
          }
        }
        for (int c = 0; c < C; c++)
          store_bf16(o + b * out.stride(0) + (h * G + g) * out.stride(1) + c * W, sum[c] / denominator);
      }
}

template <int D>
void dispatch_groups(int groups, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t length,
                     float scale, at::Tensor& out) {
  switch (groups) {
    case 1: return decode_attention_kernel<D, 1>(q, k, v, length, scale, out);
    case 2: return decode_attention_kernel<D, 2>(q, k, v, length, scale, out);
    case 3: return decode_attention_kernel<D, 3>(q, k, v, length, scale, out);
    case 4: return decode_attention_kernel<D, 4>(q, k, v, length, scale, out);
    case 5: return decode_attention_kernel<D, 5>(q, k, v, length, scale, out);
    case 6: return decode_attention_kernel<D, 6>(q, k, v, length, scale, out);
    case 7: return decode_attention_kernel<D, 7>(q, k, v, length, scale, out);
    case 8: return decode_attention_kernel<D, 8>(q, k, v, length, scale, out);
  }
  TORCH_CHECK(false, "decode_attention: 1 to 8 query heads per key/value head supported, got ", groups);
}

// query (batch, heads, 1, dim); key and value caches (batch, kv_heads, max_length, dim) with contiguous rows;
// attends to cache positions [0, valid_length). Returns (batch, heads, 1, dim).
at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            int64_t valid_length, double scale) {
  TORCH_CHECK(query.scalar_type() == at::kBFloat16 && key.scalar_type() == at::kBFloat16 &&
                  value.scalar_type() == at::kBFloat16,
              "decode_attention: bfloat16 query, key and value expected");
  TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && value.sizes() == key.sizes() && query.size(2) == 1 &&
                  query.size(0) == key.size(0) && query.size(3) == key.size(3),
              "decode_attention: query (batch, heads, 1, dim) and key/value (batch, kv_heads, length, dim) expected");
  TORCH_CHECK(query.stride(3) == 1 && key.stride(3) == 1 && value.strides() == key.strides(),
              "decode_attention: rows of query, key and value must be contiguous, key and value alike");
  TORCH_CHECK(query.size(1) % key.size(1) == 0, "decode_attention: query heads not a multiple of key/value heads");
  TORCH_CHECK(valid_length >= 1 && valid_length <= key.size(2), "decode_attention: valid_length ", valid_length,
              " outside 1..", key.size(2));
  const int groups = query.size(1) / key.size(1);
  auto out = at::empty({query.size(0), query.size(1), 1, query.size(3)}, query.options());
  switch (query.size(3)) {
    case 16: dispatch_groups<16>(groups, query, key, value, valid_length, scale, out); break;
    case 32: dispatch_groups<32>(groups, query, key, value, valid_length, scale, out); break;
    case 64: dispatch_groups<64>(groups, query, key, value, valid_length, scale, out); break;
    case 128: dispatch_groups<128>(groups, query, key, value, valid_length, scale, out); break;
    default: TORCH_CHECK(false, "decode_attention: head dim 16, 32, 64 or 128 supported, got ", query.size(3));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(assistant, m) {
  m.def("decode_attention(Tensor query, Tensor key, Tensor value, SymInt valid_length, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(assistant, CPU, m) { m.impl("decode_attention", &decode_attention); }
