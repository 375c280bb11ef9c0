/*
 * Adapts tl2cgen-generated C (header.h + main.c) to model_abi_v2.h (or, with
 * -DGW_MODEL_ABI=1, to model_abi_v1.h for hosts that predate v2).
 *
 * tl2cgen emits, per model,
 *     union Entry { int missing; T fvalue; int qvalue; };
 *     void predict(union Entry *data, int pred_margin, L *result);
 *     N_TARGET, MAX_N_CLASS, get_num_feature(), ...
 * where T is the threshold type and L the leaf output type, each float or double
 * (XGBoost models are float32, LightGBM and scikit-learn float64). Both are taken
 * from the header at compile time: T by __typeof__, L by _Generic on predict's
 * own type, so a model of any combination is fed and read in its own types, and
 * a header of any other shape fails the build ("no association matches").
 *
 * Compiled once per model with -DMODEL_NAME="..." -DMODEL_VERSION="..." and the
 * build's golden.h (golden vectors, trainer, postprocessor: abi/build_model.py).
 * Every symbol but the export is hidden (-fvisibility=hidden), so two models in
 * one process never collide.
 *
 * MODEL_TEST_FAULT (tests only) builds deliberately broken libraries:
 *   1 wrong ABI version, 2 predict always fails, 3 no export symbol, 4 init fails,
 *   5 outputs off by 1e-4 relative (a wrong model), 6 no golden vectors,
 *   7 init never returns (a hang), 8 init aborts the process (a crash),
 *   9 predict faults (a segfault) on a row whose first feature is -12345, a row
 *     no check scores (a crash on the hot path),
 *  10 init takes 1.5 s and then succeeds (a slow load),
 *  11 release takes 1 s and then tears down what init set up, which predict
 *     needs (a library whose state goes with its release),
 *  12 release aborts the process (a crash when the model is let go),
 *  13 the first output of a row whose first feature is -54321 is NaN, and the
 *     last output of a row whose first feature is -54322 is +infinity (rows no
 *     check scores: a model answering non-finite values),
 *  14 init takes 1.5 s and then succeeds, and release never returns (a slow
 *     load whose model, let go, hangs),
 *  15 predict calls a function no process defines on a row whose first
 *     feature is -11111, a row no check scores (linked without
 *     --no-undefined: a library built against something the host lacks),
 *  16 predict never returns on a row whose first feature is -22222, a row no
 *     check scores (a hang on the hot path),
 *  17 predict returns an error for a batch holding a row whose first feature
 *     is -33333, a row no check scores (a model failing on some input),
 *  18 predict never returns on a row whose first feature is missing (NaN): the
 *     load's self-test scores one (a hang in the load's checks),
 *  19 no golden vectors, and release never returns (a library refused after its
 *     init ran, whose release hangs),
 *  20 golden_outputs points 4 bytes into its array (misaligned for doubles),
 *  21 predict writes one float past the n_rows × n_outputs it was given.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>

#include "header.h"
#include "golden.h"
#include "model_abi_v1.h"
#include "model_abi_v2.h"

#ifndef MODEL_NAME
#error "MODEL_NAME must be defined"
#endif
#ifndef MODEL_VERSION
#error "MODEL_VERSION must be defined"
#endif
#ifndef MODEL_TEST_FAULT
#define MODEL_TEST_FAULT 0
#endif
#ifndef GW_MODEL_ABI
#define GW_MODEL_ABI 2
#endif
#if GW_MODEL_ABI != 1 && GW_MODEL_ABI != 2
#error "GW_MODEL_ABI must be 1 or 2"
#endif
#if !defined(__GNUC__) && !defined(__clang__)
#error "the adapter needs __typeof__ (GCC or Clang)"
#endif

#define N_OUTPUTS (N_TARGET * MAX_N_CLASS)
/* Rows per call at most: bounds the host's buffers and this adapter's arithmetic. */
#define MAX_ROWS_PER_CALL ((size_t)1 << 24)

typedef __typeof__(((union Entry *)0)->fvalue) entry_value_t;

/* The leaf type L, from predict's signature: 1 for double, 0 for float. */
#define LEAF_IS_DOUBLE                                        \
    _Generic(&predict,                                        \
             void (*)(union Entry *, int, double *): 1,       \
             void (*)(union Entry *, int, float *): 0)
/* The result buffer of predict's own type. */
#define LEAF_BUFFER(d, f)                                     \
    _Generic(&predict,                                        \
             void (*)(union Entry *, int, double *): (d),     \
             void (*)(union Entry *, int, float *): (f))

_Static_assert(GW_GOLDEN_N_FEATURES > 0, "golden.h names no feature count");
_Static_assert(GW_GOLDEN_N_OUTPUTS == N_OUTPUTS,
               "golden.h was written for another output width than header.h");

#if MODEL_TEST_FAULT == 15
extern void gw_test_symbol_no_process_defines(void);
#endif

/* Fault 11: what init sets up and release tears down. */
static _Atomic int set_up = 0;

static int32_t adapter_init(void) {
    if (MODEL_TEST_FAULT == 4) return MODEL_ERR_INTERNAL;
    if (MODEL_TEST_FAULT == 7) for (;;) sleep(3600);
    if (MODEL_TEST_FAULT == 8) abort();
    if (MODEL_TEST_FAULT == 10 || MODEL_TEST_FAULT == 14) usleep(1500 * 1000);
    set_up = 1;
    return get_num_feature() == GW_GOLDEN_N_FEATURES ? MODEL_OK : MODEL_ERR_INTERNAL;
}

static int32_t adapter_predict(const float *rows, size_t n_rows, uint32_t flags, float *out) {
    if (MODEL_TEST_FAULT == 2) return MODEL_ERR_INTERNAL;
    if (MODEL_TEST_FAULT == 11 && !set_up) return MODEL_ERR_INTERNAL;
    if ((flags & ~MODEL_PREDICT_MARGIN) != 0) return MODEL_ERR_ARGUMENT;
    if (n_rows == 0) return MODEL_OK;
    if (rows == NULL || out == NULL || n_rows > MAX_ROWS_PER_CALL) return MODEL_ERR_ARGUMENT;
    if (MODEL_TEST_FAULT == 17) {
        const size_t width = (size_t)get_num_feature();
        for (size_t i = 0; i < n_rows; i++) {
            if (rows[i * width] == -33333.0f) return MODEL_ERR_INTERNAL;
        }
    }
    const int margin = (flags & MODEL_PREDICT_MARGIN) != 0;
    const size_t n_features = (size_t)get_num_feature();
    union Entry stack[64];
    union Entry *entries = n_features <= 64 ? stack : malloc(n_features * sizeof(union Entry));
    if (entries == NULL) return MODEL_ERR_INTERNAL;
    double result_d[N_OUTPUTS];
    float result_f[N_OUTPUTS];
    for (size_t i = 0; i < n_rows; i++) {
        const float *row = rows + i * n_features;
#if MODEL_TEST_FAULT == 15
        if (row[0] == -11111.0f) gw_test_symbol_no_process_defines();
#endif
        if (MODEL_TEST_FAULT == 16 && row[0] == -22222.0f) for (;;) sleep(3600);
        if (MODEL_TEST_FAULT == 18 && isnan(row[0])) for (;;) sleep(3600);
        if (MODEL_TEST_FAULT == 9 && row[0] == -12345.0f) {
            /* A store through an address the compiler cannot know is null. */
            static volatile uintptr_t nowhere = 0;
            *(volatile int *)nowhere = 1;
        }
        for (size_t j = 0; j < n_features; j++) {
            if (isnan(row[j])) {
                entries[j].missing = -1;
            } else {
                entries[j].fvalue = (entry_value_t)row[j];
            }
        }
        /* tl2cgen's predict adds each tree's output into result: start at zero. */
        for (size_t k = 0; k < N_OUTPUTS; k++) {
            result_d[k] = 0.0;
            result_f[k] = 0.0f;
        }
        predict(entries, margin, LEAF_BUFFER(result_d, result_f));
        float *o = out + i * N_OUTPUTS;
        for (size_t k = 0; k < N_OUTPUTS; k++) {
            o[k] = LEAF_IS_DOUBLE ? (float)result_d[k] : result_f[k];
            if (MODEL_TEST_FAULT == 5) o[k] *= 1.0001f;
        }
        if (MODEL_TEST_FAULT == 13 && row[0] == -54321.0f) o[0] = NAN;
        if (MODEL_TEST_FAULT == 13 && row[0] == -54322.0f) o[N_OUTPUTS - 1] = INFINITY;
    }
    if (entries != stack) free(entries);
    if (MODEL_TEST_FAULT == 21) out[n_rows * N_OUTPUTS] = 42.0f;
    return MODEL_OK;
}

#if GW_MODEL_ABI == 2

static struct model_abi_v2 table;
static pthread_once_t table_once = PTHREAD_ONCE_INIT;

static void adapter_release(void) {
    if (MODEL_TEST_FAULT == 12) abort();
    if (MODEL_TEST_FAULT == 14 || MODEL_TEST_FAULT == 19) for (;;) sleep(3600);
    usleep(1000 * 1000);
    set_up = 0;
}

static void fill_table(void) {
    table.abi_version = MODEL_TEST_FAULT == 1 ? 99u : MODEL_ABI_V2;
    table.struct_size = (uint32_t)sizeof(struct model_abi_v2);
    table.name = MODEL_NAME;
    table.version = MODEL_VERSION;
    table.n_features = (uint32_t)get_num_feature();
    table.n_outputs = (uint32_t)N_OUTPUTS;
    table.n_targets = (uint32_t)N_TARGET;
    table.max_n_class = (uint32_t)MAX_N_CLASS;
    table.leaf_type = LEAF_IS_DOUBLE ? "float64" : "float32";
    table.postprocessor = GW_GOLDEN_POSTPROCESSOR;
    table.trainer = GW_GOLDEN_TRAINER;
    table.init = adapter_init;
    table.predict = adapter_predict;
    table.release = MODEL_TEST_FAULT == 11 || MODEL_TEST_FAULT == 12 || MODEL_TEST_FAULT == 14
                            || MODEL_TEST_FAULT == 19
                        ? adapter_release
                        : NULL;
    table.n_golden = MODEL_TEST_FAULT == 6 || MODEL_TEST_FAULT == 19 ? 0u : (uint32_t)GW_GOLDEN_N;
    table.golden_rows = gw_golden_rows;
    table.golden_outputs = MODEL_TEST_FAULT == 20
                               ? (const double *)(const void *)((const char *)gw_golden_outputs + 4)
                               : gw_golden_outputs;
    table.golden_margins = GW_GOLDEN_MARGINS;
    table.golden_scales = gw_golden_scales;
}

#if MODEL_TEST_FAULT != 3
const struct model_abi_v2 *model_abi_v2_export(void) {
    pthread_once(&table_once, fill_table);
    return &table;
}
#else
/* Keeps the table referenced so the broken build still compiles cleanly. */
MODEL_ABI_EXPORT const struct model_abi_v2 *model_abi_v0_export(void) {
    pthread_once(&table_once, fill_table);
    return &table;
}
#endif

#else /* GW_MODEL_ABI == 1: the v1 table, outputs always postprocessed */

static int32_t adapter_predict_v1(const float *rows, size_t n_rows, float *out) {
    return adapter_predict(rows, n_rows, 0u, out);
}

static struct model_abi_v1 table;
static pthread_once_t table_once = PTHREAD_ONCE_INIT;

static void fill_table(void) {
    table.abi_version = MODEL_ABI_V1;
    table.struct_size = (uint32_t)sizeof(struct model_abi_v1);
    table.name = MODEL_NAME;
    table.version = MODEL_VERSION;
    table.n_features = (uint32_t)get_num_feature();
    table.n_outputs = (uint32_t)N_OUTPUTS;
    table.init = adapter_init;
    table.predict = adapter_predict_v1;
    table.release = NULL;
}

const struct model_abi_v1 *model_abi_v1_export(void) {
    pthread_once(&table_once, fill_table);
    return &table;
}

#endif
