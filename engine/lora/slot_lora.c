/* The kernel form of a thin mixed batch's LoRA (engine/lora/native.py builds and loads it).

   For each row i of a decode step, on adapter slot s = slot[i] (< 0: the base model, skipped),
   and each module j of one projection group at one layer:
       out[i, col_j : col_j + out_j] += (x[i] . A_j[s]^T) . B_j[s]
   reading only the slot's own rank[s] rows of A_j[s] ([rank, in], PEFT's orientation) and of
   B_j[s] ([rank, out_j]: PEFT's B transposed, scaling folded in), straight from the slot
   tables, summing in float32 and rounding once into out.

   With many adapters in a step the cost is reading their weights, a few KB per row and module
   from unrelated places: the hardware prefetcher only catches up within each block, so the
   blocks of the row after next are prefetched into L2 while this row computes. Rows are split
   between the calling thread's OpenMP team (torch's, when built with -fopenmp). */
#include <stdint.h>
#include <string.h>

#define MAX_MODULES 4
#ifndef PREFETCH_ROWS
#define PREFETCH_ROWS 2
#endif

typedef struct {
  int32_t in, modules;
  int64_t a_slot;                     /* elements between two slots' A (the group's fused A) */
  const void *a[MAX_MODULES];         /* module j's A at this layer, slot 0 */
  const void *b[MAX_MODULES];         /* module j's B at this layer, slot 0 */
  int64_t b_slot[MAX_MODULES];        /* elements between two slots' B */
  int32_t outs[MAX_MODULES], cols[MAX_MODULES];
} plan_t;

static inline float bf16_to_f32(uint16_t v) {
  uint32_t u = (uint32_t)v << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, NaN stays NaN */
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline void prefetch(const void *p, int64_t bytes) {
  const char *c = (const char *)p;
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 2);
}

#define LOAD_bf16(p) bf16_to_f32(p)
#define LOAD_f32(p) (p)
#define STORE_bf16(v) f32_to_bf16(v)
#define STORE_f32(v) (v)

#define SLOT_LORA(NAME, T, TAG)                                                                   \
  void NAME(int32_t n, const T *x, int64_t xs, const int64_t *slot, const int32_t *rank,          \
            const plan_t *p, T *out, int64_t os) {                                               \
    const int in = p->in;                                                                         \
    int max_out = 0;                                                                              \
    for (int j = 0; j < p->modules; j++)                                                          \
      if (p->outs[j] > max_out) max_out = p->outs[j];                                             \
    _Pragma("omp parallel for schedule(static) if(n > 1)")                                        \
    for (int i = 0; i < n; i++) {                                                                 \
      const int64_t s = slot[i];                                                                  \
      if (s < 0) continue;                                                                        \
      const int r = rank[s];                                                                      \
      float xf[in], xa[r > 0 ? r : 1], y[max_out];                                                \
      int ahead = i + PREFETCH_ROWS;                                                              \
      while (ahead < n && slot[ahead] < 0) ahead++;                                               \
      const T *xi = x + (int64_t)i * xs;                                                          \
      for (int k = 0; k < in; k++) xf[k] = LOAD_##TAG(xi[k]);                                     \
      for (int j = 0; j < p->modules; j++) {                                                      \
        const int no = p->outs[j];                                                                \
        const T *a = (const T *)p->a[j] + s * p->a_slot;                                          \
        const T *b = (const T *)p->b[j] + s * p->b_slot[j];                                       \
        if (ahead < n) {                                                                          \
          const int64_t s2 = slot[ahead];                                                         \
          prefetch((const T *)p->a[j] + s2 * p->a_slot, (int64_t)rank[s2] * in * sizeof(T));      \
          prefetch((const T *)p->b[j] + s2 * p->b_slot[j], (int64_t)rank[s2] * no * sizeof(T));   \
        }                                                                                         \
        int c = 0;                                                                                \
        for (; c + 4 <= r; c += 4) { /* four A rows against one x: four sums in flight */         \
          const T *a0 = a + (int64_t)c * in, *a1 = a0 + in, *a2 = a1 + in, *a3 = a2 + in;         \
          float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;                                           \
          _Pragma("omp simd reduction(+:s0,s1,s2,s3)")                                            \
          for (int k = 0; k < in; k++) {                                                          \
            const float v = xf[k];                                                                \
            s0 += v * LOAD_##TAG(a0[k]);                                                          \
            s1 += v * LOAD_##TAG(a1[k]);                                                          \
            s2 += v * LOAD_##TAG(a2[k]);                                                          \
            s3 += v * LOAD_##TAG(a3[k]);                                                          \
          }                                                                                       \
          xa[c] = s0; xa[c + 1] = s1; xa[c + 2] = s2; xa[c + 3] = s3;                             \
        }                                                                                         \
        for (; c < r; c++) {                                                                      \
          const T *ac = a + (int64_t)c * in;                                                      \
          float s0 = 0.f;                                                                         \
          _Pragma("omp simd reduction(+:s0)")                                                     \
          for (int k = 0; k < in; k++) s0 += xf[k] * LOAD_##TAG(ac[k]);                           \
          xa[c] = s0;                                                                             \
        }                                                                                         \
        for (int o = 0; o < no; o++) y[o] = 0.f;                                                  \
        for (c = 0; c < r; c++) {                                                                 \
          const T *bc = b + (int64_t)c * no;                                                      \
          const float v = xa[c];                                                                  \
          _Pragma("omp simd")                                                                     \
          for (int o = 0; o < no; o++) y[o] += v * LOAD_##TAG(bc[o]);                             \
        }                                                                                         \
        T *oi = out + (int64_t)i * os + p->cols[j];                                               \
        _Pragma("omp simd")                                                                       \
        for (int o = 0; o < no; o++) oi[o] = STORE_##TAG(LOAD_##TAG(oi[o]) + y[o]);               \
      }                                                                                           \
    }                                                                                             \
  }

SLOT_LORA(slot_lora_bf16, uint16_t, bf16)
SLOT_LORA(slot_lora_f32, float, f32)

/* the layout the caller's ctypes mirror must match */
int32_t slot_lora_plan_size(void) { return (int32_t)sizeof(plan_t); }
