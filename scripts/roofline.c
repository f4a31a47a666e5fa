// Peak multiply-accumulate throughput of this CPU, the roofline that benchmark GMAC/s are read
// against: fp32 FMA and int8 dot-product instructions on independent registers (no memory
// traffic), one thread per requested core. Prints one JSON line.
//
//   cc -O2 -march=native -pthread scripts/roofline.c -o roofline && ./roofline 2
//
// fp32: AVX-512 FMA (16 MAC per instruction) or AVX2 FMA (8). int8: AVX-512 VNNI vpdpbusd
// (64 u8*s8 MAC), AVX-VNNI (32), or AVX2 vpmaddubsw + vpmaddwd + vpaddd (32 MAC in three
// instructions, what int8 kernels without VNNI use). ARM NEON: fp32 vfmaq (4), int8 sdot (16).
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__x86_64__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

#define CHAINS 12  // independent accumulators: enough to cover FMA latency x ports
#define ITERS 20000000L

// Twelve named accumulators (an array would live in memory, bound by store forwarding).
#define DECLARE(T, init) T c0 = init(0), c1 = init(1), c2 = init(2), c3 = init(3), c4 = init(4), \
  c5 = init(5), c6 = init(6), c7 = init(7), c8 = init(8), c9 = init(9), c10 = init(10), c11 = init(11)
#define EACH(S) S(c0); S(c1); S(c2); S(c3); S(c4); S(c5); S(c6); S(c7); S(c8); S(c9); S(c10); S(c11)
#define SUM(R) (R(c0) + R(c1) + R(c2) + R(c3) + R(c4) + R(c5) + R(c6) + R(c7) + R(c8) + R(c9) + R(c10) + R(c11))
// The timed loop: CHAINS accumulators of type T, each stepped ITERS times, summed into `sink`
// (so the compiler cannot drop the work).
#define PEAK(T, init, step, lane_sum, sink) \
  do { \
    DECLARE(T, init); \
    for (long i = 0; i < ITERS; i++) { EACH(step); } \
    sink = SUM(lane_sum); \
  } while (0)

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static volatile float sink_f;
static volatile int sink_i;

static const char *fp32_isa;
static const char *int8_isa;

static void *fp32_kernel(void *arg) {
  (void)arg;
#if defined(__AVX512F__)
  fp32_isa = "avx512f fma";
  __m512 a = _mm512_set1_ps(1.0000001f), b = _mm512_set1_ps(0.9999999f);
#define F512_INIT(k) _mm512_set1_ps((float)k)
#define F512_STEP(x) x = _mm512_fmadd_ps(x, a, b)
  PEAK(__m512, F512_INIT, F512_STEP, _mm512_reduce_add_ps, sink_f);
#elif defined(__AVX2__) && defined(__FMA__)
  fp32_isa = "avx2 fma";
  __m256 a = _mm256_set1_ps(1.0000001f), b = _mm256_set1_ps(0.9999999f);
#define F256_INIT(k) _mm256_set1_ps((float)k)
#define F256_STEP(x) x = _mm256_fmadd_ps(x, a, b)
#define F256_LANE0(x) _mm256_cvtss_f32(x)
  PEAK(__m256, F256_INIT, F256_STEP, F256_LANE0, sink_f);
#elif defined(__aarch64__)
  fp32_isa = "neon fma";
  float32x4_t a = vdupq_n_f32(1.0000001f), b = vdupq_n_f32(0.9999999f);
#define FNEON_INIT(k) vdupq_n_f32((float)k)
#define FNEON_STEP(x) x = vfmaq_f32(b, x, a)
  PEAK(float32x4_t, FNEON_INIT, FNEON_STEP, vaddvq_f32, sink_f);
#else
#error "no SIMD FMA path for this target"
#endif
  return NULL;
}

static int fp32_macs_per_instruction(void) {
#if defined(__AVX512F__)
  return 16;
#elif defined(__AVX2__)
  return 8;
#else
  return 4;
#endif
}

static void *int8_kernel(void *arg) {
  (void)arg;
#if defined(__AVX512VNNI__)
  int8_isa = "avx512 vnni vpdpbusd";
  __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-2);
#define Q512_INIT(k) _mm512_set1_epi32(k)
#define Q512_STEP(x) x = _mm512_dpbusd_epi32(x, a, b)
  PEAK(__m512i, Q512_INIT, Q512_STEP, _mm512_reduce_add_epi32, sink_i);
#elif defined(__AVXVNNI__)
  int8_isa = "avx-vnni vpdpbusd";
  __m256i a = _mm256_set1_epi8(3), b = _mm256_set1_epi8(-2);
#define QVNNI256_INIT(k) _mm256_set1_epi32(k)
#define QVNNI256_STEP(x) x = _mm256_dpbusd_avx_epi32(x, a, b)
#define QVNNI256_LANE0(x) _mm256_cvtsi256_si32(x)
  PEAK(__m256i, QVNNI256_INIT, QVNNI256_STEP, QVNNI256_LANE0, sink_i);
#elif defined(__AVX2__)
  int8_isa = "avx2 vpmaddubsw+vpmaddwd+vpaddd";
  __m256i a = _mm256_set1_epi8(3), b = _mm256_set1_epi8(-2), ones = _mm256_set1_epi16(1);
#define Q256_INIT(k) _mm256_set1_epi32(k)
#define Q256_STEP(x) x = _mm256_add_epi32(x, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), ones))
#define Q256_LANE0(x) _mm256_cvtsi256_si32(x)
  PEAK(__m256i, Q256_INIT, Q256_STEP, Q256_LANE0, sink_i);
#elif defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD)
  int8_isa = "neon sdot";
  int8x16_t a = vdupq_n_s8(3), b = vdupq_n_s8(-2);
#define QNEON_INIT(k) vdupq_n_s32(k)
#define QNEON_STEP(x) x = vdotq_s32(x, a, b)
  PEAK(int32x4_t, QNEON_INIT, QNEON_STEP, vaddvq_s32, sink_i);
#else
  int8_isa = "none";
#endif
  return NULL;
}

static int int8_macs_per_instruction(void) {
#if defined(__AVX512VNNI__)
  return 64;
#elif defined(__AVX2__) || defined(__AVXVNNI__)
  return 32;
#elif defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD)
  return 16;
#else
  return 0;
#endif
}

// Runs `kernel` on `threads` threads at once; returns GMAC/s over all of them.
static double measure(void *(*kernel)(void *), int threads, int macs_per_instruction) {
  pthread_t *ids = calloc((size_t)threads, sizeof *ids);
  double t = now();
  for (int i = 0; i < threads; i++) pthread_create(&ids[i], NULL, kernel, NULL);
  for (int i = 0; i < threads; i++) pthread_join(ids[i], NULL);
  t = now() - t;
  free(ids);
  return (double)threads * ITERS * CHAINS * macs_per_instruction / t / 1e9;
}

int main(int argc, char **argv) {
  int threads = argc > 1 ? atoi(argv[1]) : 1;
  if (threads < 1) {
    fprintf(stderr, "usage: %s THREADS (a positive number)\n", argv[0]);
    return 2;
  }
  // Best of three: a shared machine only ever makes a run slower.
  double fp32 = 0, int8 = 0;
  for (int r = 0; r < 3; r++) {
    double f = measure(fp32_kernel, threads, fp32_macs_per_instruction());
    double q = int8_macs_per_instruction() ? measure(int8_kernel, threads, int8_macs_per_instruction()) : 0;
    if (f > fp32) fp32 = f;
    if (q > int8) int8 = q;
  }
  printf("{\"threads\": %d, \"fp32_gmacs\": %.1f, \"fp32_isa\": \"%s\", \"int8_gmacs\": %.1f, \"int8_isa\": \"%s\"}\n",
         threads, fp32, fp32_isa, int8, int8_isa ? int8_isa : "none");
  return 0;
}
