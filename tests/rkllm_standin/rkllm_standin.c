/*
 * rkllm_standin.c: a STAND-IN for Rockchip's librkllmrt.so (RKLLM runtime 1.2.x), for tests.
 *
 * This is not the RKLLM runtime and runs no language model. It exports the runtime's symbols
 * with the struct layouts of the public rkllm.h of 1.2.1 (the default build) or of 1.3.0
 * (-DSTANDIN_ABI_1_3), field by field (sizes and offsets asserted below) and runs a tiny deterministic "model" behind them, so that
 * pytest-longctx's ctypes binding (backends/rkllm_backend.py) is exercised for real: structs
 * crossing the boundary, the result callback (including one that pauses), error states,
 * context limits and logits.
 *
 * The stand-in model. A model file is a text header (see write_model in __init__.py):
 *     RKLLM-STANDIN-MODEL 1
 *     n_layers=4 n_kv_heads=4 head_dim=64 value_bytes=2 vocab_size=512 max_context=4096 seed=7
 * (one key=value a line; optional: toolkit_version=1.2.1, target_platform=RK3576, eos_token=N).
 * A model whose toolkit_version is of another major.minor than the runtime, or whose
 * target_platform is not RK3588 (the stand-in's platform), is refused by rkllm_init with -1,
 * naming what it found. eos_token ends a GENERATE run, unless 1.3's ignore_eos_token is set.
 * A file without that first line is refused by rkllm_init with -1,
 * as the real runtime refuses a file that is not a model. The state after each token is a
 * 64-bit hash of the token sequence so far; the logits of a position are a fixed function of
 * its state, so a prompt given whole or in chunks, or again after a reset, gives the same
 * logits bit for bit. Greedy generation feeds the argmax back. Every position written also
 * fills value_bytes x 2 (K and V) x n_layers x n_kv_heads x head_dim bytes of a KV buffer that
 * is reserved for max_context positions and becomes resident as it is written, so the
 * process's memory grows by exactly the analytic KV size per position; rkllm_clear_kv_cache
 * gives those pages back. The performance statistics are measured (clock_gettime) and
 * memory_usage_mb is the process's VmHWM, which is what the real runtime reports.
 *
 * Behaviour copied from the real runtime (1.2.1), as users report it:
 *   - rkllm_init prints "rkllm-runtime version: X.Y.Z" and the model's "max_context_limit: N";
 *   - rkllm_init refuses max_context_len above the model's converted context with
 *     "max_context[N] must be less than the model's max_context_limit[M]" and -1;
 *   - n_batch must be between 1 and 100 (the stand-in runs 1);
 *   - errors during a run reach the callback as state RKLLM_RUN_ERROR;
 *   - a callback returning 1 pauses the run (rkllm_run returns; the token it was shown is
 *     not fed back; a later rkllm_run continues from the context);
 *   - in RKLLM_INFER_GET_LOGITS mode the result holds one row of logits per input token.
 * What the real runtime does with a prompt that passes max_context_len is not documented;
 * the stand-in refuses it whole by default (callback ERROR, -1, context unchanged), and
 * can be switched to the failures the suite must catch (below).
 *
 * Faults, read by rkllm_init from RKLLM_STANDIN_FAULTS (comma-separated):
 *   limit-half       a prompt passing the limit is taken up to the limit, then ERROR and -1
 *   limit-shift      a prompt passing the limit shifts the window (drops positions after
 *                    n_keep) and succeeds, like a context shift
 *   error-state@N    the N-th rkllm_run takes half its tokens, then reports ERROR through the
 *                    callback and returns 0
 *   error-return@N   the N-th rkllm_run returns -1 without calling the callback
 *   logits-last-row  GET_LOGITS returns only the last row
 *   no-limit-log     rkllm_init does not print the model's max_context_limit when it succeeds
 *
 * Build variants (the tests compile each with the system C compiler):
 *   (none)                 the 1.2.1 ABI; the binary holds "rkllm-runtime version: 1.2.1"
 *   -DSTANDIN_ABI_1_3      the 1.3.0 ABI, working: RKLLMParam without img_*, ignore_eos_token;
 *                          image and video parts in the multimodal input; RKLLMInferParam
 *                          with sampling_params and max_new_tokens (both honoured per run);
 *                          rkllm_init takes an RKLLMCallback*; version 1.3.0
 *   -DSTANDIN_VERSION='"1.4.0"' another version text (a release no binding knows)
 *   -DSTANDIN_ABI_1_2_0    no rkllm_get_kv_cache_size, as in 1.2.0; version 1.2.0
 *   -DSTANDIN_SPLIT_VERSION the version is printed through "%s", so the binary holds no
 *                          "rkllm-runtime version: X.Y.Z" string
 */
#define _GNU_SOURCE
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#if defined(STANDIN_VERSION)
/* given on the command line: a library of a version no binding knows (1.4.0) */
#elif defined(STANDIN_ABI_1_3)
#define STANDIN_VERSION "1.3.0"
#elif defined(STANDIN_ABI_1_2_0)
#define STANDIN_VERSION "1.2.0"
#else
#define STANDIN_VERSION "1.2.1"
#endif
#define STANDIN_PLATFORM "RK3588"

#define EXPORT __attribute__((visibility("default")))

/* ---- the ABI (rkllm.h 1.2.1/1.2.2 field order; 1.3.0 where marked) ------------------------ */

typedef void *LLMHandle;

typedef enum { RKLLM_RUN_NORMAL = 0, RKLLM_RUN_WAITING = 1, RKLLM_RUN_FINISH = 2, RKLLM_RUN_ERROR = 3 } LLMCallState;
typedef enum { RKLLM_INPUT_PROMPT = 0, RKLLM_INPUT_TOKEN = 1, RKLLM_INPUT_EMBED = 2, RKLLM_INPUT_MULTIMODAL = 3 } RKLLMInputType;
typedef enum { RKLLM_INFER_GENERATE = 0, RKLLM_INFER_GET_LAST_HIDDEN_LAYER = 1, RKLLM_INFER_GET_LOGITS = 2 } RKLLMInferMode;

typedef struct {
    int32_t base_domain_id;
    int8_t embed_flash;
    int8_t enabled_cpus_num;
    uint32_t enabled_cpus_mask;
    uint8_t n_batch;
    int8_t use_cross_attn;
    uint8_t reserved[104];
} RKLLMExtendParam;

typedef struct {
    const char *model_path;
    int32_t max_context_len;
    int32_t max_new_tokens;
    int32_t top_k;
    int32_t n_keep;
    float top_p;
    float temperature;
    float repeat_penalty;
    float frequency_penalty;
    float presence_penalty;
    int32_t mirostat;
    float mirostat_tau;
    float mirostat_eta;
    bool skip_special_token;
#if defined(STANDIN_ABI_1_3)
    bool ignore_eos_token;
    bool is_async;
#else
    bool is_async;
    const char *img_start;
    const char *img_end;
    const char *img_content;
#endif
    RKLLMExtendParam extend_param;
} RKLLMParam;

typedef struct { float *embed; size_t n_tokens; } RKLLMEmbedInput;
typedef struct { int32_t *input_ids; size_t n_tokens; } RKLLMTokenInput;
#if defined(STANDIN_ABI_1_3)
typedef struct {
    char *prompt;
    struct {
        float *image_embed;
        size_t n_image_tokens;
        size_t n_image;
        const char *image_start;
        const char *image_end;
        const char *image_content;
        size_t image_width;
        size_t image_height;
    } image;
    struct {
        float *video_embed;
        size_t n_frame_tokens;
        size_t n_frame_per_video;
        size_t n_video;
        const char *video_start;
        const char *video_end;
        const char *video_content;
        size_t frame_width;
        size_t frame_height;
    } video;
} RKLLMMultiModelInput;
#else
typedef struct {
    char *prompt;
    float *image_embed;
    size_t n_image_tokens;
    size_t n_image;
    size_t image_width;
    size_t image_height;
} RKLLMMultiModelInput;
#endif

typedef struct {
    const char *role;
    bool enable_thinking;
    RKLLMInputType input_type;
    union {
        const char *prompt_input;
        RKLLMEmbedInput embed_input;
        RKLLMTokenInput token_input;
        RKLLMMultiModelInput multimodal_input;
    };
} RKLLMInput;

typedef struct { const char *lora_adapter_name; } RKLLMLoraParam;
typedef struct { int save_prompt_cache; const char *prompt_cache_path; } RKLLMPromptCacheParam;

typedef struct {
    int32_t top_k;
    float top_p;
    float temperature;
    float repeat_penalty;
    float frequency_penalty;
    float presence_penalty;
    int32_t mirostat;
    float mirostat_tau;
    float mirostat_eta;
} RKLLMSamplingParam; /* 1.3 only; declared in both builds, passed only in 1.3 */

typedef struct {
    RKLLMInferMode mode;
    RKLLMLoraParam *lora_params;
    RKLLMPromptCacheParam *prompt_cache_params;
#if defined(STANDIN_ABI_1_3)
    RKLLMSamplingParam *sampling_params;
    int keep_history;
    int32_t max_new_tokens;
#else
    int keep_history;
#endif
} RKLLMInferParam;

typedef struct { const float *hidden_states; int embd_size; int num_tokens; } RKLLMResultLastHiddenLayer;
typedef struct { const float *logits; int vocab_size; int num_tokens; } RKLLMResultLogits;
typedef struct {
    float prefill_time_ms;
    int prefill_tokens;
    float generate_time_ms;
    int generate_tokens;
    float memory_usage_mb;
} RKLLMPerfStat;

typedef struct {
    const char *text;
    int32_t token_id;
    RKLLMResultLastHiddenLayer last_hidden_layer;
    RKLLMResultLogits logits;
    RKLLMPerfStat perf;
} RKLLMResult;

typedef int (*LLMResultCallback)(RKLLMResult *result, void *userdata, LLMCallState state);

#if defined(STANDIN_ABI_1_3)
typedef struct {
    LLMResultCallback result_callback;
    void *result_userdata;
    int (*tokenizer_callback)(void *userdata, const char *text, int32_t text_len, int32_t *tokens, int32_t n_max);
    void *tokenizer_userdata;
    int (*embed_callback)(void *userdata, int32_t *tokens, uint64_t num_tokens, void *embed, uint64_t len);
    void *embed_userdata;
} RKLLMCallback;
#endif

/* The layout facts of rkllm.h of airockchip/rknn-llm v1.2.1 and v1.3.0 (LP64; docs/backends/rkllm.md). */
#if !defined(STANDIN_ABI_1_3)
_Static_assert(sizeof(RKLLMExtendParam) == 120, "RKLLMExtendParam is 120 bytes");
_Static_assert(sizeof(RKLLMParam) == 208, "RKLLMParam is 208 bytes");
_Static_assert(offsetof(RKLLMParam, extend_param) == 88, "extend_param at 88");
_Static_assert(offsetof(RKLLMExtendParam, n_batch) == 12, "n_batch at 12 of the extend param");
_Static_assert(sizeof(RKLLMInput) == 64, "RKLLMInput is 64 bytes");
_Static_assert(offsetof(RKLLMInput, token_input) == 16, "the input union at 16");
_Static_assert(sizeof(RKLLMInferParam) == 32, "RKLLMInferParam is 32 bytes");
_Static_assert(offsetof(RKLLMInferParam, keep_history) == 24, "keep_history at 24");
_Static_assert(sizeof(RKLLMResult) == 72, "RKLLMResult is 72 bytes");
_Static_assert(offsetof(RKLLMResult, logits) == 32, "logits at 32");
_Static_assert(offsetof(RKLLMResult, perf) == 48, "perf at 48");
_Static_assert(sizeof(RKLLMPerfStat) == 20, "RKLLMPerfStat is 20 bytes");
#else
_Static_assert(sizeof(RKLLMParam) == 184, "1.3.0 RKLLMParam is 184 bytes");
_Static_assert(offsetof(RKLLMParam, extend_param) == 60, "1.3.0 extend_param at 60");
_Static_assert(sizeof(RKLLMInput) == 160, "1.3.0 RKLLMInput is 160 bytes");
_Static_assert(sizeof(RKLLMInferParam) == 40, "1.3.0 RKLLMInferParam is 40 bytes");
_Static_assert(offsetof(RKLLMInferParam, max_new_tokens) == 36, "1.3.0 max_new_tokens at 36");
_Static_assert(sizeof(RKLLMCallback) == 48, "1.3.0 RKLLMCallback is 48 bytes");
_Static_assert(sizeof(RKLLMResult) == 72, "RKLLMResult is 72 bytes");
#endif

/* What a binding can find in the binary without calling it: the runtime prints this line
 * at rkllm_init ("I rkllm: rkllm-runtime version: 1.2.1, rknpu driver version: ..."). */
#if !defined(STANDIN_SPLIT_VERSION)
__attribute__((used)) static const char standin_banner[] =
    "rkllm-runtime version: " STANDIN_VERSION " (stand-in for librkllmrt.so, not the Rockchip runtime)";
#else
static const char *volatile standin_version = STANDIN_VERSION;
#endif

/* ---- the stand-in model ------------------------------------------------------------------- */

enum { FAULT_LIMIT_HALF = 1, FAULT_LIMIT_SHIFT = 2, FAULT_LOGITS_LAST_ROW = 4, FAULT_NO_LIMIT_LOG = 8 };

typedef struct {
    LLMResultCallback callback;
    void *callback_userdata; /* 1.3: RKLLMCallback.result_userdata; 1.2: rkllm_run's */
    int eos;                 /* <0: none */
    bool ignore_eos;
    int top_k;               /* RKLLMParam's; 1.3 runs may override */
    int last_top_k, last_max_new_tokens, last_sampling_from_run;
    char toolkit[32], target_platform[32];
    int n_layers, n_kv_heads, head_dim, value_bytes, vocab, model_context;
    uint64_t seed;
    int context;        /* max_context_len in force */
    int n_keep;         /* kept at the start by a context shift */
    int max_new_tokens; /* <= 0: until the context is full */
    size_t position_bytes;
    unsigned char *kv;  /* context x position_bytes, reserved; resident as written */
    size_t kv_reserved;
    uint64_t *states;   /* state after each position */
    int length;
    float *logits;
    size_t logits_rows;
    char text[32];
    unsigned faults;
    int error_state_at, error_return_at, runs;
} Standin;

static uint64_t mix(uint64_t x) { /* splitmix64 */
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

static uint64_t state_after(const Standin *s, uint64_t previous, int32_t token) {
    return mix(previous ^ mix((uint64_t)(uint32_t)token + 0x1000193ULL * s->seed));
}

static float logit(uint64_t state, int v) {
    uint64_t x = mix(state ^ ((uint64_t)(v + 1) * 0xD1B54A32D192ED03ULL));
    return (float)(x >> 40) * (8.0f / 16777216.0f) - 4.0f; /* [-4, 4) in steps of 2^-21 */
}

static uint64_t last_state(const Standin *s) { return s->length ? s->states[s->length - 1] : mix(s->seed); }

static int argmax(uint64_t state, int vocab) {
    int best = 0;
    float top = logit(state, 0);
    for (int v = 1; v < vocab; v++) {
        float x = logit(state, v);
        if (x > top) { top = x; best = v; }
    }
    return best;
}

static int sampled(uint64_t state, int vocab) {
    int best = -1;
    float top = 0.0f;
    for (int v = 0; v < vocab; v++) {
        if (!(mix(state ^ (uint64_t)v) & 1)) continue;
        float x = logit(state, v);
        if (best < 0 || x > top) { top = x; best = v; }
    }
    return best < 0 ? 0 : best;
}

static void write_position(Standin *s, int p, uint64_t state) {
    unsigned char *dst = s->kv + (size_t)p * s->position_bytes;
    size_t words = s->position_bytes / 8, w;
    for (w = 0; w < words; w++) {
        uint64_t value = state ^ (w * 0x9E3779B97F4A7C15ULL);
        memcpy(dst + 8 * w, &value, 8);
    }
    for (w = 8 * words; w < s->position_bytes; w++) dst[w] = (unsigned char)(state >> (8 * (w % 8)));
}

/* Gives back the resident pages of positions from..context-1 (whole pages only). */
static void release_from(Standin *s, int from) {
    long page = sysconf(_SC_PAGESIZE);
    uintptr_t start = (uintptr_t)(s->kv + (size_t)from * s->position_bytes);
    uintptr_t end = (uintptr_t)(s->kv + s->kv_reserved);
    start = (start + (uintptr_t)page - 1) & ~((uintptr_t)page - 1);
    if (end > start) madvise((void *)start, end - start, MADV_DONTNEED);
}

/* Appends one token; with a full context, shifts the window if that fault is on. */
static int append(Standin *s, int32_t token) {
    uint64_t state = state_after(s, last_state(s), token);
    if (s->length == s->context) {
        if (!(s->faults & FAULT_LIMIT_SHIFT)) return -1;
        int keep = s->n_keep > 0 && s->n_keep < s->context ? s->n_keep : 0;
        int discard = (s->context - keep) / 2 > 0 ? (s->context - keep) / 2 : 1;
        memmove(s->kv + (size_t)keep * s->position_bytes, s->kv + (size_t)(keep + discard) * s->position_bytes,
                (size_t)(s->length - keep - discard) * s->position_bytes);
        memmove(s->states + keep, s->states + keep + discard, (size_t)(s->length - keep - discard) * sizeof(uint64_t));
        s->length -= discard;
    }
    write_position(s, s->length, state);
    s->states[s->length++] = state;
    return 0;
}

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static float vm_hwm_mb(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kb = 0;
    if (!f) return 0.0f;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "VmHWM: %ld kB", &kb) == 1) break;
    fclose(f);
    return (float)kb / 1024.0f;
}

static int fail(Standin *s, RKLLMResult *result, void *userdata, int status, const char *message) {
    fprintf(stderr, "E rkllm-standin: %s\n", message);
    fflush(stderr);
    if (s && s->callback) {
        result->perf.memory_usage_mb = vm_hwm_mb();
        s->callback(result, userdata, RKLLM_RUN_ERROR);
    }
    return status;
}

/* ---- the exported functions ---------------------------------------------------------------- */

EXPORT RKLLMParam rkllm_createDefaultParam(void) {
    RKLLMParam p;
    memset(&p, 0, sizeof p);
    p.max_context_len = 512;
    p.max_new_tokens = -1;
    p.top_k = 40;
    p.n_keep = -1;
    p.top_p = 0.9f;
    p.temperature = 0.8f;
    p.repeat_penalty = 1.1f;
    p.mirostat_tau = 5.0f;
    p.mirostat_eta = 0.1f;
    p.skip_special_token = true;
    p.extend_param.n_batch = 1;
    return p;
}

__attribute__((unused)) static int parse_model(Standin *s, const char *path) {
    FILE *f = fopen(path, "r");
    char line[256];
    if (!f) return -1;
    if (!fgets(line, sizeof line, f) || strncmp(line, "RKLLM-STANDIN-MODEL 1", 21) != 0) {
        fclose(f);
        return -2;
    }
    s->n_layers = s->n_kv_heads = s->head_dim = s->vocab = s->model_context = 0;
    s->value_bytes = 2;
    s->seed = 1;
    s->eos = -1;
    while (fgets(line, sizeof line, f)) {
        char key[64], text[32];
        unsigned long long value;
        if (sscanf(line, "%63[a-z_]=%31s", key, text) != 2) continue;
        if (!strcmp(key, "toolkit_version")) { snprintf(s->toolkit, sizeof s->toolkit, "%s", text); continue; }
        if (!strcmp(key, "target_platform")) { snprintf(s->target_platform, sizeof s->target_platform, "%s", text); continue; }
        if (!strcmp(key, "eos_token")) { s->eos = atoi(text); continue; }
        value = strtoull(text, NULL, 10);
        if (!strcmp(key, "n_layers")) s->n_layers = (int)value;
        else if (!strcmp(key, "n_kv_heads")) s->n_kv_heads = (int)value;
        else if (!strcmp(key, "head_dim")) s->head_dim = (int)value;
        else if (!strcmp(key, "value_bytes")) s->value_bytes = (int)value;
        else if (!strcmp(key, "vocab_size")) s->vocab = (int)value;
        else if (!strcmp(key, "max_context")) s->model_context = (int)value;
        else if (!strcmp(key, "seed")) s->seed = value;
    }
    fclose(f);
    if (s->n_layers <= 0 || s->n_kv_heads <= 0 || s->head_dim <= 0 || s->value_bytes <= 0 || s->vocab <= 0 ||
        s->model_context <= 0)
        return -3;
    return 0;
}

__attribute__((unused)) static void read_faults(Standin *s) {
    const char *text = getenv("RKLLM_STANDIN_FAULTS");
    char buffer[256], *item, *save = NULL;
    if (!text) return;
    snprintf(buffer, sizeof buffer, "%s", text);
    for (item = strtok_r(buffer, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
        while (*item == ' ') item++;
        if (!strcmp(item, "limit-half")) s->faults |= FAULT_LIMIT_HALF;
        else if (!strcmp(item, "limit-shift")) s->faults |= FAULT_LIMIT_SHIFT;
        else if (!strcmp(item, "logits-last-row")) s->faults |= FAULT_LOGITS_LAST_ROW;
        else if (!strcmp(item, "no-limit-log")) s->faults |= FAULT_NO_LIMIT_LOG;
        else if (sscanf(item, "error-state@%d", &s->error_state_at) == 1) continue;
        else if (sscanf(item, "error-return@%d", &s->error_return_at) == 1) continue;
        else fprintf(stderr, "W rkllm-standin: unknown fault %s in RKLLM_STANDIN_FAULTS\n", item);
    }
}

static void destroy(Standin *s) {
    if (!s) return;
    if (s->kv) munmap(s->kv, s->kv_reserved);
    free(s->states);
    free(s->logits);
    free(s);
}

static int init(LLMHandle *handle, RKLLMParam *param, LLMResultCallback callback, void *userdata) {
    Standin *s;
    int status;
    char message[512];
    if (!handle || !param || !param->model_path) return -1;
    *handle = NULL;
#if defined(STANDIN_SPLIT_VERSION)
    fprintf(stdout, "I rkllm-standin: rkllm-runtime version: %s (stand-in), platform: " STANDIN_PLATFORM "\n", standin_version);
#else
    fprintf(stdout, "I rkllm-standin: %s, platform: " STANDIN_PLATFORM "\n", standin_banner);
#endif
    fflush(stdout);
    if (param->extend_param.n_batch < 1 || param->extend_param.n_batch > 100) {
        fprintf(stderr, "E rkllm-standin: The n_batch must be between 1 and 100, but got %d\n",
                param->extend_param.n_batch);
        return -1;
    }
    if (param->extend_param.n_batch != 1) {
        fprintf(stderr, "E rkllm-standin: the stand-in runs n_batch 1 only, got %d\n", param->extend_param.n_batch);
        return -1;
    }
    s = calloc(1, sizeof *s);
    if (!s) return -1;
    status = parse_model(s, param->model_path);
    if (status == -1) {
        fprintf(stderr, "E rkllm-standin: cannot open model file %s\n", param->model_path);
        free(s);
        return -1;
    }
    if (status < 0) {
        fprintf(stderr, "E rkllm-standin: invalid stand-in model magic or header in %s\n", param->model_path);
        free(s);
        return -1;
    }
    /* What users report the runtime prints for a model of another toolkit version or platform
     * ("The model version is too old, please use the latest toolkit to reconvert the model!",
     * "The model target_platform does not match!"); the stand-in names what it found. */
    if (s->toolkit[0] && strncmp(s->toolkit, STANDIN_VERSION, 4) != 0) {
        fprintf(stderr, "E rkllm-standin: model version %s does not match the runtime, please use rkllm-toolkit "
                "%.4sx to reconvert the model!\n", s->toolkit, STANDIN_VERSION);
        free(s);
        return -1;
    }
    if (s->target_platform[0] && strcasecmp(s->target_platform, STANDIN_PLATFORM) != 0) {
        fprintf(stderr, "E rkllm-standin: The model target_platform %s does not match!\n", s->target_platform);
        free(s);
        return -1;
    }
    if (param->max_context_len > s->model_context) {
        snprintf(message, sizeof message, "max_context[%d] must be less than the model's max_context_limit[%d]",
                 param->max_context_len, s->model_context);
        fprintf(stderr, "E rkllm-standin: %s\n", message);
        free(s);
        return -1;
    }
    read_faults(s);
    if (!(s->faults & FAULT_NO_LIMIT_LOG)) {
        fprintf(stdout, "I rkllm-standin: stand-in model, max_context_limit: %d, n_layers: %d, vocab: %d\n",
                s->model_context, s->n_layers, s->vocab);
        fflush(stdout);
    }
    s->callback = callback;
    s->callback_userdata = userdata;
    s->top_k = param->top_k;
#if defined(STANDIN_ABI_1_3)
    s->ignore_eos = param->ignore_eos_token;
#endif
    s->context = param->max_context_len > 0 ? param->max_context_len : s->model_context;
    s->n_keep = param->n_keep;
    s->max_new_tokens = param->max_new_tokens;
    s->position_bytes = (size_t)2 * s->n_layers * s->n_kv_heads * s->head_dim * s->value_bytes;
    s->kv_reserved = (size_t)s->context * s->position_bytes;
    s->kv = mmap(NULL, s->kv_reserved, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    s->states = malloc((size_t)s->context * sizeof(uint64_t));
    if (s->kv == MAP_FAILED || !s->states) {
        if (s->kv == MAP_FAILED) s->kv = NULL;
        fprintf(stderr, "E rkllm-standin: cannot reserve %zu bytes of KV\n", s->kv_reserved);
        destroy(s);
        return -1;
    }
    *handle = s;
    return 0;
}

#if defined(STANDIN_ABI_1_3)
EXPORT int rkllm_init(LLMHandle *handle, RKLLMParam *param, RKLLMCallback *callback) {
    if (!callback || !callback->result_callback) {
        if (handle) *handle = NULL;
        fprintf(stderr, "E rkllm-standin: rkllm_init needs an RKLLMCallback with a result_callback\n");
        return -1;
    }
    return init(handle, param, callback->result_callback, callback->result_userdata);
}
#else
EXPORT int rkllm_init(LLMHandle *handle, RKLLMParam *param, LLMResultCallback callback) {
    return init(handle, param, callback, NULL);
}
#endif

EXPORT int rkllm_destroy(LLMHandle handle) {
    destroy((Standin *)handle);
    return 0;
}

static int compute_logits(Standin *s, int first, int rows) {
    size_t need = (size_t)rows * (size_t)s->vocab;
    if (need > s->logits_rows * (size_t)s->vocab) {
        float *grown = realloc(s->logits, need * sizeof(float));
        if (!grown) return -1;
        s->logits = grown;
        s->logits_rows = (size_t)rows;
    }
    for (int r = 0; r < rows; r++) {
        uint64_t state = s->states[first + r];
        float *row = s->logits + (size_t)r * s->vocab;
        for (int v = 0; v < s->vocab; v++) row[v] = logit(state, v);
    }
    return 0;
}

EXPORT int rkllm_run(LLMHandle handle, RKLLMInput *input, RKLLMInferParam *infer, void *userdata) {
    Standin *s = (Standin *)handle;
    RKLLMResult result;
    RKLLMInferMode mode = infer ? infer->mode : RKLLM_INFER_GENERATE;
    int keep_history = infer ? infer->keep_history : 0;
    char message[256];
    double start;
    size_t n, i;
    int status;
    memset(&result, 0, sizeof result);
    if (!s || !input) return -1;
    s->runs++;
    int top_k = s->top_k, max_new_tokens = s->max_new_tokens;
    s->last_sampling_from_run = 0;
#if defined(STANDIN_ABI_1_3)
    userdata = s->callback_userdata; /* 1.3 hands the callback RKLLMCallback.result_userdata */
    if (infer && infer->sampling_params) {
        top_k = infer->sampling_params->top_k;
        s->last_sampling_from_run = 1;
    }
    if (infer && infer->max_new_tokens > 0) max_new_tokens = infer->max_new_tokens;
#endif
    s->last_top_k = top_k;
    s->last_max_new_tokens = max_new_tokens;
    if (s->error_return_at == s->runs) {
        fprintf(stderr, "E rkllm-standin: run %d: injected failure (error-return@%d)\n", s->runs, s->runs);
        return -1;
    }
    if (input->input_type != RKLLM_INPUT_TOKEN)
        return fail(s, &result, userdata, -1, "the stand-in takes token input (RKLLM_INPUT_TOKEN) only");
    if (mode != RKLLM_INFER_GENERATE && mode != RKLLM_INFER_GET_LOGITS)
        return fail(s, &result, userdata, -1, "the stand-in runs GENERATE and GET_LOGITS modes only");
    n = input->token_input.n_tokens;
    if (n == 0 || !input->token_input.input_ids) return fail(s, &result, userdata, -1, "empty token input");
    for (i = 0; i < n; i++) {
        int32_t id = input->token_input.input_ids[i];
        if (id < 0 || id >= s->vocab) {
            snprintf(message, sizeof message, "token id %d at %zu is outside the vocabulary [0, %d)", id, i, s->vocab);
            return fail(s, &result, userdata, -1, message);
        }
    }
    if (!keep_history) {
        s->length = 0;
        release_from(s, 0);
    }
    if ((size_t)s->length + n > (size_t)s->context && !(s->faults & FAULT_LIMIT_SHIFT)) {
        snprintf(message, sizeof message, "%zu tokens at position %d would pass max_context_len %d", n, s->length,
                 s->context);
        if (s->faults & FAULT_LIMIT_HALF)
            for (i = 0; i < n && s->length < s->context; i++) append(s, input->token_input.input_ids[i]);
        return fail(s, &result, userdata, -1, message);
    }
    start = now_ms();
    int first = -1;
    if (s->error_state_at == s->runs) {
        for (i = 0; i < n / 2; i++) append(s, input->token_input.input_ids[i]);
        snprintf(message, sizeof message, "run %d: injected error state after %zu of %zu tokens (error-state@%d)",
                 s->runs, n / 2, n, s->runs);
        return fail(s, &result, userdata, 0, message);
    }
    for (i = 0; i < n; i++) {
        if (append(s, input->token_input.input_ids[i]) != 0) return fail(s, &result, userdata, -1, "append failed");
    }
    first = s->length - (int)(n < (size_t)s->length ? n : (size_t)s->length);
    result.perf.prefill_time_ms = (float)(now_ms() - start);
    result.perf.prefill_tokens = (int)n;

    if (mode == RKLLM_INFER_GET_LOGITS) {
        int rows = s->length - first;
        if (s->faults & FAULT_LOGITS_LAST_ROW) first = s->length - 1, rows = 1;
        if (compute_logits(s, first, rows) != 0) return fail(s, &result, userdata, -1, "out of memory for logits");
        result.perf.prefill_time_ms = (float)(now_ms() - start);
        result.perf.memory_usage_mb = vm_hwm_mb();
        result.logits.logits = s->logits;
        result.logits.vocab_size = s->vocab;
        result.logits.num_tokens = rows;
        result.token_id = -1;
        s->callback(&result, userdata, RKLLM_RUN_NORMAL);
        memset(&result.logits, 0, sizeof result.logits);
        s->callback(&result, userdata, RKLLM_RUN_FINISH);
        return 0;
    }

    /* GENERATE: greedy with top_k 1, else the best of a pseudo-random half of the vocabulary
     * (a stand-in for sampling); the token shown to the callback is fed only when the callback
     * returns 0; the model's eos_token ends the run (FINISH, not fed) unless 1.3's
     * ignore_eos_token is set. */
    double generate_start = now_ms();
    int produced = 0;
    for (;;) {
        if (max_new_tokens > 0 && produced >= max_new_tokens) break;
        int token = top_k == 1 ? argmax(last_state(s), s->vocab) : sampled(last_state(s), s->vocab);
        if (token == s->eos && !s->ignore_eos) break;
        snprintf(s->text, sizeof s->text, "<%d>", token);
        result.text = s->text;
        result.token_id = token;
        result.perf.generate_tokens = produced + 1;
        result.perf.generate_time_ms = (float)(now_ms() - generate_start);
        result.perf.memory_usage_mb = vm_hwm_mb();
        status = s->callback(&result, userdata, RKLLM_RUN_NORMAL);
        if (status == 1) return 0; /* paused */
        if (s->length == s->context) {
            snprintf(message, sizeof message, "the context is full (%d) after %d generated tokens", s->context, produced);
            return fail(s, &result, userdata, -1, message);
        }
        append(s, token);
        produced++;
    }
    result.text = NULL;
    result.token_id = -1;
    result.perf.generate_tokens = produced;
    result.perf.generate_time_ms = (float)(now_ms() - generate_start);
    result.perf.memory_usage_mb = vm_hwm_mb();
    s->callback(&result, userdata, RKLLM_RUN_FINISH);
    return 0;
}

EXPORT int rkllm_run_async(LLMHandle handle, RKLLMInput *input, RKLLMInferParam *infer, void *userdata) {
    return rkllm_run(handle, input, infer, userdata);
}

EXPORT int rkllm_abort(LLMHandle handle) { return handle ? 0 : -1; }
EXPORT int rkllm_is_running(LLMHandle handle) { return handle ? 1 : -1; }

#if defined(STANDIN_ABI_1_2_0)
EXPORT int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt) {
    Standin *s = (Standin *)handle;
    (void)keep_system_prompt;
    if (!s) return -1;
    s->length = 0;
    release_from(s, 0);
    return 0;
}
#else
EXPORT int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt, int *start_pos, int *end_pos) {
    Standin *s = (Standin *)handle;
    (void)keep_system_prompt;
    if (!s) return -1;
    if (start_pos || end_pos) {
        fprintf(stderr, "E rkllm-standin: clearing ranges of the KV cache is not implemented in the stand-in\n");
        return -1;
    }
    s->length = 0;
    release_from(s, 0);
    return 0;
}

EXPORT int rkllm_get_kv_cache_size(LLMHandle handle, int *cache_sizes) {
    Standin *s = (Standin *)handle;
    if (!s || !cache_sizes) return -1;
    cache_sizes[0] = s->length;
    return 0;
}
#endif

EXPORT int rkllm_load_lora(LLMHandle handle, void *lora_adapter) { (void)handle; (void)lora_adapter; return -1; }
EXPORT int rkllm_load_prompt_cache(LLMHandle handle, const char *path) { (void)handle; (void)path; return -1; }
EXPORT int rkllm_release_prompt_cache(LLMHandle handle) { (void)handle; return 0; }
EXPORT int rkllm_set_chat_template(LLMHandle handle, const char *system_prompt, const char *prefix, const char *postfix) {
    (void)system_prompt; (void)prefix; (void)postfix;
    return handle ? 0 : -1;
}
EXPORT int rkllm_set_function_tools(LLMHandle handle, const char *system_prompt, const char *tools, const char *response) {
    (void)system_prompt; (void)tools; (void)response;
    return handle ? 0 : -1;
}
EXPORT int rkllm_set_cross_attn_params(LLMHandle handle, void *params) { (void)handle; (void)params; return -1; }

/* Stand-in only (no such symbols in librkllmrt.so; the binding never calls them). */

/* The layout as this compiler lays it out, by name, for the tests to compare with ctypes and
 * with the figures worked out from rkllm.h. */
#define ROW(label, value) {label, (long)(value)}
EXPORT int rkllm_standin_layout(const char **names, long *values, int n) {
    static const struct { const char *name; long value; } rows[] = {
        ROW("sizeof(RKLLMExtendParam)", sizeof(RKLLMExtendParam)),
        ROW("offsetof(RKLLMExtendParam, n_batch)", offsetof(RKLLMExtendParam, n_batch)),
        ROW("sizeof(RKLLMParam)", sizeof(RKLLMParam)),
        ROW("offsetof(RKLLMParam, skip_special_token)", offsetof(RKLLMParam, skip_special_token)),
        ROW("offsetof(RKLLMParam, is_async)", offsetof(RKLLMParam, is_async)),
#if defined(STANDIN_ABI_1_3)
        ROW("offsetof(RKLLMParam, ignore_eos_token)", offsetof(RKLLMParam, ignore_eos_token)),
#else
        ROW("offsetof(RKLLMParam, img_start)", offsetof(RKLLMParam, img_start)),
        ROW("offsetof(RKLLMParam, img_content)", offsetof(RKLLMParam, img_content)),
#endif
        ROW("offsetof(RKLLMParam, extend_param)", offsetof(RKLLMParam, extend_param)),
        ROW("sizeof(RKLLMMultiModalInput)", sizeof(RKLLMMultiModelInput)),
#if defined(STANDIN_ABI_1_3)
        ROW("offsetof(RKLLMMultiModalInput, image.image_start)", offsetof(RKLLMMultiModelInput, image.image_start)),
        ROW("offsetof(RKLLMMultiModalInput, video)", offsetof(RKLLMMultiModelInput, video)),
        ROW("offsetof(RKLLMMultiModalInput, video.frame_height)", offsetof(RKLLMMultiModelInput, video.frame_height)),
        ROW("sizeof(RKLLMSamplingParam)", sizeof(RKLLMSamplingParam)),
        ROW("offsetof(RKLLMSamplingParam, mirostat_eta)", offsetof(RKLLMSamplingParam, mirostat_eta)),
        ROW("offsetof(RKLLMInferParam, sampling_params)", offsetof(RKLLMInferParam, sampling_params)),
        ROW("offsetof(RKLLMInferParam, max_new_tokens)", offsetof(RKLLMInferParam, max_new_tokens)),
        ROW("sizeof(RKLLMCallback)", sizeof(RKLLMCallback)),
        ROW("offsetof(RKLLMCallback, embed_userdata)", offsetof(RKLLMCallback, embed_userdata)),
#else
        ROW("offsetof(RKLLMMultiModalInput, image_height)", offsetof(RKLLMMultiModelInput, image_height)),
#endif
        ROW("sizeof(RKLLMInput)", sizeof(RKLLMInput)),
        ROW("offsetof(RKLLMInput, input_type)", offsetof(RKLLMInput, input_type)),
        ROW("offsetof(RKLLMInput, token_input)", offsetof(RKLLMInput, token_input)),
        ROW("sizeof(RKLLMInferParam)", sizeof(RKLLMInferParam)),
        ROW("offsetof(RKLLMInferParam, keep_history)", offsetof(RKLLMInferParam, keep_history)),
        ROW("sizeof(RKLLMResult)", sizeof(RKLLMResult)),
        ROW("offsetof(RKLLMResult, logits)", offsetof(RKLLMResult, logits)),
        ROW("offsetof(RKLLMResult, perf)", offsetof(RKLLMResult, perf)),
    };
    int count = (int)(sizeof rows / sizeof rows[0]);
    for (int i = 0; i < n && i < count; i++) {
        names[i] = rows[i].name;
        values[i] = rows[i].value;
    }
    return count;
}

/* What the last rkllm_run ran with: top_k, max_new_tokens, whether the sampling came from the
 * run's RKLLMInferParam (1.3), and ignore_eos_token. */
EXPORT int rkllm_standin_last_run(LLMHandle handle, int *out) {
    Standin *s = (Standin *)handle;
    if (!s || !out) return -1;
    out[0] = s->last_top_k;
    out[1] = s->last_max_new_tokens;
    out[2] = s->last_sampling_from_run;
    out[3] = s->ignore_eos;
    return 0;
}
