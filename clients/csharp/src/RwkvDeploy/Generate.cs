// Sampling and streaming generation (the C# mirror of rwkv_deploy/runtime/generate.py).
using System;
using System.Collections.Generic;
using System.Diagnostics;
using System.Globalization;
using System.Linq;

namespace RwkvDeploy
{
    /// <summary>SplitMix64: a small seeded generator, the same on every runtime (System.Random's algorithm is not
    /// specified), so a seed reproduces the same text under mono and .NET.</summary>
    public sealed class Rng
    {
        ulong state;

        public Rng(ulong seed) { state = seed; }

        public static Rng FromTime() { return new Rng((ulong)DateTime.UtcNow.Ticks ^ (ulong)Guid.NewGuid().GetHashCode() << 32); }

        public ulong Next()
        {
            ulong z = state += 0x9E3779B97F4A7C15UL;
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
            z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
            return z ^ (z >> 31);
        }

        /// <summary>Uniform in [0, 1).</summary>
        public double NextDouble() { return (Next() >> 11) * (1.0 / 9007199254740992.0); }
    }

    public static class Sampling
    {
        /// <summary>Nucleus sampling over logits[0 .. n): the smallest set of most probable ids whose probability
        /// reaches topP (among equally probable ids, the lower ids first), renormalised; temperature 0 is greedy (the
        /// first maximum). The set is found by selection (3-way partitions around pivots), not by sorting all n ids:
        /// a vocabulary of 65536 costs about a millisecond, not the 50 ms that a full sort takes under mono.</summary>
        public static int Sample(float[] logits, int n, Rng rng, double temperature, double topP)
        {
            n = Math.Min(n, logits.Length);
            if (temperature == 0)
            {
                int best = 0;
                for (int i = 1; i < n; i++) if (logits[i] > logits[best]) best = i;
                return best;
            }
            double max = double.NegativeInfinity;
            for (int i = 0; i < n; i++) max = Math.Max(max, logits[i]);
            if (scratchP == null || scratchP.Length < n)  // reused: a fresh 0.8 MB per token keeps mono's GC busy
            {
                scratchP = new double[n];
                scratchIdx = new int[n];
            }
            double[] p = scratchP;
            int[] idx = scratchIdx;
            double sum = 0;
            for (int i = 0; i < n; i++) sum += p[i] = Math.Exp((logits[i] - max) / temperature);
            for (int i = 0; i < n; i++)
            {
                p[i] /= sum;
                idx[i] = i;
            }
            // invariant: idx[0 .. lo) is in the nucleus, idx[hi .. n) is not, idx[lo .. hi) is undecided;
            // `need` is the probability still to be covered
            int lo = 0, hi = n, keep = -1;
            double need = topP;
            while (lo < hi)
            {
                int a = idx[lo], b = idx[lo + (hi - lo) / 2], c = idx[hi - 1];
                double v = Math.Max(Math.Min(p[a], p[b]), Math.Min(Math.Max(p[a], p[b]), p[c]));  // median of three
                int lt = lo, i = lo, gt = hi;  // [lo, lt) > v, [lt, gt) == v, [gt, hi) < v
                while (i < gt)
                {
                    double x = p[idx[i]];
                    if (x > v) Swap(idx, lt++, i++);
                    else if (x < v) Swap(idx, i, --gt);
                    else i++;
                }
                double greater = 0;
                for (int k = lo; k < lt; k++) greater += p[idx[k]];
                if (greater >= need) { hi = lt; continue; }  // the nucleus ends among the greater ones
                need -= greater;
                double equal = (gt - lt) * v;
                if (equal >= need)  // it ends among the equal ones: take them by id until the mass is reached
                {
                    Array.Sort(idx, lt, gt - lt);
                    keep = lt;
                    while (keep < gt && need > 0) { need -= v; keep++; }
                    break;
                }
                need -= equal;
                lo = gt;
            }
            if (keep < 0) keep = lo;  // everything decided: idx[0 .. lo) (all ids if rounding kept the sum below topP)
            double mass = 0;
            for (int k = 0; k < keep; k++) mass += p[idx[k]];
            double u = rng.NextDouble() * mass;
            for (int k = 0; k < keep; k++)
            {
                u -= p[idx[k]];
                if (u < 0) return idx[k];
            }
            return idx[keep - 1];
        }

        [ThreadStatic] static double[] scratchP;
        [ThreadStatic] static int[] scratchIdx;

        static void Swap(int[] a, int i, int j)
        {
            int t = a[i];
            a[i] = a[j];
            a[j] = t;
        }
    }

    public sealed class GenerateOptions
    {
        public int MaxTokens = 100;
        public double Temperature = 1.0;
        public double TopP = 0.85;
        public ulong? Seed;

        public void Validate()
        {
            if (!(Temperature >= 0 && !double.IsInfinity(Temperature)) || !(TopP > 0 && TopP <= 1) || MaxTokens < 0)
                throw new RwkvError($"need a finite temperature >= 0, 0 < top_p <= 1, max_tokens >= 0; got {Temperature}, " +
                                    $"{TopP}, {MaxTokens}");
            if (Seed.HasValue && Seed.Value >= (1UL << 63))
                throw new RwkvError($"the seed must be an integer in [0, 2**63); got {Seed.Value}");
        }
    }

    /// <summary>What Generate did: the prompt (one forward call) and the generated tokens, in seconds.</summary>
    public sealed class GenerationStats
    {
        public int PromptTokens, Tokens;
        public double PromptSeconds, Seconds;

        /// <summary>e.g. "24 tokens in 0.51 s: 47.1 tokens/s (prompt 8 tokens in 0.02 s)".</summary>
        public string Line()
        {
            var c = CultureInfo.InvariantCulture;
            string rate = Seconds > 0 ? (Tokens / Seconds).ToString("0.0", c) : "-";
            return $"{Tokens} tokens in {Seconds.ToString("0.00", c)} s: {rate} tokens/s " +
                   $"(prompt {PromptTokens} tokens in {PromptSeconds.ToString("0.00", c)} s)";
        }
    }

    public static class Generator
    {
        /// <summary>Generate after `prompt`, calling onPiece with text as it becomes valid UTF-8 (the pieces join to
        /// exactly the decoded text). Stops after MaxTokens, or when the sampled id is one of `stopIds` (that token is
        /// not shown). Ids the tokenizer lacks (models carry more logits than it has ids) are never sampled.</summary>
        public static void Generate(RwkvSession session, ITokenizer tok, ICollection<int> stopIds, string prompt,
                                    GenerateOptions options, Action<string> onPiece, GenerationStats stats = null)
        {
            options.Validate();
            int[] ids = tok.Encode(prompt);
            if (ids.Length == 0) throw new RwkvError("the prompt is empty; pass some text with --prompt");
            var rng = options.Seed.HasValue ? new Rng(options.Seed.Value) : Rng.FromTime();
            stats = stats ?? new GenerationStats();
            var clock = Stopwatch.StartNew();
            State state;
            float[] logits;
            using (var init = session.InitialState())
                logits = session.Forward(ids.Select(i => (long)i).ToArray(), init, out state);
            stats.PromptTokens = ids.Length;
            stats.PromptSeconds = clock.Elapsed.TotalSeconds;
            clock.Restart();
            var stream = new TextStream(tok);
            try
            {
                for (int n = 0; n < options.MaxTokens; n++)
                {
                    int next = Sampling.Sample(logits, tok.VocabSize, rng, options.Temperature, options.TopP);
                    if (stopIds.Contains(next)) break;
                    stats.Tokens = n + 1;
                    stats.Seconds = clock.Elapsed.TotalSeconds;
                    string piece = stream.Push(next);
                    if (piece.Length > 0) onPiece(piece);
                    if (n + 1 < options.MaxTokens)  // the logits after the last token would never be used
                    {
                        State after;
                        logits = session.Step(next, state, out after);
                        state.Dispose();
                        state = after;
                    }
                }
            }
            finally
            {
                state.Dispose();
            }
            string tail = stream.Finish();
            if (tail.Length > 0) onPiece(tail);
        }
    }
}
