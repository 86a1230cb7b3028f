/* The simulator's timeline (haq.sim.timeline.run_policy) for the two policies whose decisions
 * need no Python: per-layer LRU (mixtral-offloading) and Fiddler (static popularity placement,
 * CPU when n * cpu_per_token < copy + device time). Same arithmetic in the same order as the
 * Python loop, so every result is bit-equal to it (tests/test_sim_native.py); prefetching
 * policies and lookaheads stay in Python. Built and loaded by haq.sim.native_replay.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { POLICY_LRU = 0, POLICY_FIDDLER = 1 };

typedef struct {
    int64_t steps, layers, experts;
    const int64_t *offsets; /* [steps * layers + 1]: the calls of (step, layer) */
    const int32_t *expert, *tokens; /* [calls] */
    const double *ne; /* [steps] non-expert seconds of each layer of the step */
    const double *t_cpu, *t_dev; /* [max tokens + 1] */
    double t_copy, act_roundtrip, nbytes, cpu_bw, shared_bw;
    int32_t device_is_host, policy;
    int64_t slots; /* lru: experts per layer */
    const uint8_t *pinned; /* fiddler: [layers * experts] */
    double cpu_per_token, copy_and_run; /* fiddler's rule */
    int64_t expert_bytes, initial_resident_bytes;
} haq_replay_in;
/* experts: the largest expert id called or pinned, plus one (rows of the per-expert arrays) */

typedef struct {
    double *hits, *calls; /* [layers] */
    double *step_latency; /* [steps] */
    int64_t *step_hits, *step_calls; /* [steps] */
    int64_t cpu_calls, copies, staged, peak_resident_bytes;
} haq_replay_out;

typedef struct {
    double ready;
    int32_t n;
} dev_call;

/* CPU call duration; while the link is busy (until link_free) weights stream at the shared rate. */
static double cpu_call_time(const haq_replay_in *in, int32_t n, double start, double link_free) {
    if (link_free <= start) return in->t_cpu[n];
    double busy = link_free - start, stream;
    if (busy * in->shared_bw >= in->nbytes)
        stream = in->nbytes / in->shared_bw;
    else
        stream = busy + (in->nbytes - busy * in->shared_bw) / in->cpu_bw;
    return in->t_cpu[n] - in->nbytes / in->cpu_bw + stream;
}

static int by_ready(const void *a, const void *b) { /* Python's tuple order: (ready, n) */
    const dev_call *x = a, *y = b;
    if (x->ready != y->ready) return x->ready < y->ready ? -1 : 1;
    return (x->n > y->n) - (x->n < y->n);
}

/* Returns 0, or -1 when scratch memory could not be had. */
int haq_replay(const haq_replay_in *in, haq_replay_out *out) {
    int64_t L = in->layers, E = in->experts, cells = L * E;
    double *ready_at = calloc((size_t)cells, sizeof(double)); /* 0: none pending (Python's .get default) */
    int64_t *stamp = calloc((size_t)cells, sizeof(int64_t)); /* lru: last use; 0: not resident */
    int64_t *count = calloc((size_t)L, sizeof(int64_t)); /* lru: resident experts per layer */
    int64_t widest = 1;
    for (int64_t c = 0; c < in->steps * L; c++)
        if (in->offsets[c + 1] - in->offsets[c] > widest) widest = in->offsets[c + 1] - in->offsets[c];
    dev_call *ready = malloc((size_t)widest * sizeof(dev_call)), *copied = malloc((size_t)widest * sizeof(dev_call));
    int32_t *cpu_work = malloc((size_t)widest * sizeof(int32_t));
    if (!ready_at || !stamp || !count || !ready || !copied || !cpu_work) {
        free(ready_at), free(stamp), free(count), free(ready), free(copied), free(cpu_work);
        return -1;
    }
    int64_t clock_tick = 0, resident = 0;
    double clock = 0.0, free_at = 0.0;
    int64_t peak = in->initial_resident_bytes; /* fiddler: its pinned experts, all along */
    for (int64_t s = 0; s < in->steps; s++) {
        double start = clock, ne = in->ne[s];
        int64_t hits = 0, calls = 0;
        for (int64_t l = 0; l < L; l++) {
            clock += ne;
            double now = clock;
            int64_t nr = 0, nc = 0, ncpu = 0, layer_copies = 0;
            int64_t c0 = in->offsets[s * L + l], c1 = in->offsets[s * L + l + 1];
            for (int64_t c = c0; c < c1; c++) {
                int64_t key = l * E + in->expert[c];
                int32_t n = in->tokens[c];
                int hit;
                if (in->policy == POLICY_LRU) {
                    hit = stamp[key] != 0;
                    if (hit) stamp[key] = ++clock_tick;
                } else {
                    hit = in->pinned[key] != 0;
                }
                if (hit) {
                    out->hits[l] += 1.0;
                    hits++;
                    ready[nr].ready = ready_at[key] > clock ? ready_at[key] : clock;
                    ready[nr++].n = n;
                    continue;
                }
                if (in->policy == POLICY_FIDDLER && (double)n * in->cpu_per_token < in->copy_and_run) {
                    cpu_work[ncpu++] = n;
                    continue;
                }
                int admit = 0;
                if (in->policy == POLICY_LRU && in->slots > 0) {
                    while (count[l] >= in->slots) { /* evict the layer's least recently used */
                        int64_t victim = -1;
                        for (int64_t e = 0; e < E; e++)
                            if (stamp[l * E + e] && (victim < 0 || stamp[l * E + e] < stamp[victim])) victim = l * E + e;
                        stamp[victim] = 0;
                        ready_at[victim] = 0.0;
                        count[l]--;
                        resident--;
                    }
                    stamp[key] = ++clock_tick;
                    count[l]++;
                    resident++;
                    admit = 1;
                }
                out->copies++;
                layer_copies++;
                free_at = (now > free_at ? now : free_at) + in->t_copy;
                if (admit) ready_at[key] = free_at;
                else out->staged = 1;
                copied[nc].ready = free_at;
                copied[nc++].n = n;
            }
            out->calls[l] += (double)(c1 - c0);
            calls += c1 - c0;
            out->cpu_calls += ncpu;
            if (in->device_is_host) { /* one set of cores: copies, device and CPU calls in turn */
                double cpu_s = 0.0, dev_s = 0.0;
                for (int64_t i = 0; i < ncpu; i++) cpu_s += in->t_cpu[cpu_work[i]];
                for (int64_t i = 0; i < nr; i++) dev_s += in->t_dev[ready[i].n];
                for (int64_t i = 0; i < nc; i++) dev_s += in->t_dev[copied[i].n];
                clock += (double)layer_copies * in->t_copy + cpu_s + dev_s;
                free_at = clock;
                continue;
            }
            double cpu_end = clock;
            for (int64_t i = 0; i < ncpu; i++) cpu_end += cpu_call_time(in, cpu_work[i], cpu_end, free_at);
            if (ncpu) cpu_end += in->act_roundtrip;
            double dev_end = clock;
            if (nr > 1) qsort(ready, (size_t)nr, sizeof(dev_call), by_ready);
            for (int64_t i = 0; i < nr; i++) dev_end = (dev_end > ready[i].ready ? dev_end : ready[i].ready) + in->t_dev[ready[i].n];
            for (int64_t i = 0; i < nc; i++) dev_end = (dev_end > copied[i].ready ? dev_end : copied[i].ready) + in->t_dev[copied[i].n];
            clock = cpu_end > dev_end ? cpu_end : dev_end;
        }
        out->step_latency[s] = clock - start;
        out->step_hits[s] = hits;
        out->step_calls[s] = calls;
        if (in->policy == POLICY_LRU && resident * in->expert_bytes > peak) peak = resident * in->expert_bytes;
    }
    out->peak_resident_bytes = peak;
    free(ready_at), free(stamp), free(count), free(ready), free(copied), free(cpu_work);
    return 0;
}
