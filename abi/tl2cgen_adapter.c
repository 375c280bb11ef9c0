/*
 * Adapts tl2cgen-generated C (header.h + main.c: predict(union Entry*, int,
 * double*), get_num_feature(), N_TARGET, MAX_N_CLASS) to model_abi_v1.h.
 * Compiled once per model with -DMODEL_NAME="..." -DMODEL_VERSION="...".
 * Every symbol but model_abi_v1_export is hidden (-fvisibility=hidden), so two
 * models in one process never collide.
 *
 * MODEL_TEST_FAULT (tests only) builds deliberately broken libraries:
 *   1 wrong ABI version, 2 predict always fails, 3 no export symbol,
 *   4 init fails.
 */
#include <math.h>
#include <pthread.h>
#include <stdlib.h>

#include "header.h"
#include "model_abi_v1.h"

#ifndef MODEL_NAME
#error "MODEL_NAME must be defined"
#endif
#ifndef MODEL_VERSION
#error "MODEL_VERSION must be defined"
#endif
#ifndef MODEL_TEST_FAULT
#define MODEL_TEST_FAULT 0
#endif

#define N_OUTPUTS (N_TARGET * MAX_N_CLASS)
/* Rows per call at most: bounds the host's buffers and this adapter's arithmetic. */
#define MAX_ROWS_PER_CALL ((size_t)1 << 24)

static int32_t adapter_init(void) {
    if (MODEL_TEST_FAULT == 4) return MODEL_ERR_INTERNAL;
    return get_num_feature() > 0 ? MODEL_OK : MODEL_ERR_INTERNAL;
}

static int32_t adapter_predict(const float *rows, size_t n_rows, float *out) {
    if (MODEL_TEST_FAULT == 2) return MODEL_ERR_INTERNAL;
    if (n_rows == 0) return MODEL_OK;
    if (rows == NULL || out == NULL || n_rows > MAX_ROWS_PER_CALL) return MODEL_ERR_ARGUMENT;
    const size_t n_features = (size_t)get_num_feature();
    union Entry stack[64];
    union Entry *entries = n_features <= 64 ? stack : malloc(n_features * sizeof(union Entry));
    if (entries == NULL) return MODEL_ERR_INTERNAL;
    double result[N_OUTPUTS];
    for (size_t i = 0; i < n_rows; i++) {
        const float *row = rows + i * n_features;
        for (size_t j = 0; j < n_features; j++) {
            if (isnan(row[j])) {
                entries[j].missing = -1;
            } else {
                entries[j].fvalue = (double)row[j];
            }
        }
        /* tl2cgen's predict adds each tree's output into result: start at zero. */
        for (size_t k = 0; k < N_OUTPUTS; k++) result[k] = 0.0;
        predict(entries, 0, result);
        for (size_t k = 0; k < N_OUTPUTS; k++) out[i * N_OUTPUTS + k] = (float)result[k];
    }
    if (entries != stack) free(entries);
    return MODEL_OK;
}

static struct model_abi_v1 table;
static pthread_once_t table_once = PTHREAD_ONCE_INIT;

static void fill_table(void) {
    table.abi_version = MODEL_TEST_FAULT == 1 ? 99u : MODEL_ABI_V1;
    table.struct_size = (uint32_t)sizeof(struct model_abi_v1);
    table.name = MODEL_NAME;
    table.version = MODEL_VERSION;
    table.n_features = (uint32_t)get_num_feature();
    table.n_outputs = (uint32_t)N_OUTPUTS;
    table.init = adapter_init;
    table.predict = adapter_predict;
    table.release = NULL;
}

#if MODEL_TEST_FAULT != 3
const struct model_abi_v1 *model_abi_v1_export(void) {
    pthread_once(&table_once, fill_table);
    return &table;
}
#else
/* Keeps the table referenced so the broken build still compiles cleanly. */
MODEL_ABI_EXPORT const struct model_abi_v1 *model_abi_v0_export(void) {
    pthread_once(&table_once, fill_table);
    return &table;
}
#endif
