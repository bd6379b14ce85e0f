// `check`: replay an export's golden logits (manifest "golden"; the C# mirror of rwkv_deploy/runtime/check.py).
// Feed the golden tokens one at a time (batch 1, the step graph, from the initial state) and hold the logits to
// the manifest's rule: every row max|Δlogit| / std(golden row) <= tolerance.normalised, and top-1 agreement
// (a near-tie within that distance counts) on at least tolerance.top1 of the rows.
using System;
using System.Collections.Generic;
using System.Globalization;
using System.IO;
using System.Linq;
using System.Text;

namespace RwkvDeploy
{
    public sealed class CheckResult
    {
        public int[] Tokens;
        public double[] Distance;  // per row: max|Δlogit| / std(golden row)
        public bool[] Top1;        // per row: argmax agrees, near-ties counted
        public double Tolerance, Top1Required;

        public bool Passed { get { return Failures().Count == 0; } }

        public List<string> Failures()
        {
            var out_ = new List<string>();
            int worst = 0;
            for (int i = 1; i < Distance.Length; i++)
                if (double.IsNaN(Distance[i]) || (!double.IsNaN(Distance[worst]) && Distance[i] > Distance[worst])) worst = i;
            if (!(Distance[worst] <= Tolerance))  // `!(<=)`: a NaN fails
                out_.Add($"logits of row {worst} are {Fmt.G3(Distance[worst])} (max|Δ|/std) from the golden logits, more " +
                         $"than the tolerance {Fmt.G(Tolerance)}");
            double share = Top1.Count(a => a) / (double)Top1.Length;
            if (share < Top1Required)
                out_.Add($"top-1 agrees on {Fmt.Percent(share)} of rows, less than {Fmt.Percent(Top1Required)}");
            return out_;
        }

        public string Reason() { return string.Join("; ", Failures()); }

        public string Table()
        {
            var sb = new StringBuilder();
            sb.AppendLine($"{"row",4} {"token",7} {"max|Δ|/std",11}  top-1");
            for (int t = 0; t < Tokens.Length; t++)
                sb.AppendLine($"{t,4} {Tokens[t],7} {Fmt.G3(Distance[t]),11}  {(Top1[t] ? "ok" : "DIFFERS")}");
            sb.AppendLine($"tolerance: max|Δ|/std <= {Fmt.G(Tolerance)}, top-1 >= {Fmt.Percent(Top1Required)} (near-ties count)");
            sb.Append(Passed ? "PASS" : "FAIL: " + Reason());
            return sb.ToString();
        }
    }

    public static class GoldenCheck
    {
        /// <summary>The golden logits [T][V] of an export folder; a folder whose golden file does not fit is bad input.</summary>
        public static float[][] ReadGolden(Manifest m)
        {
            var g = m.Golden;
            if (g.Rows != g.Tokens.Length || g.Cols != m.VocabSize)
                throw new RwkvError($"{m.ManifestPath} golden.shape [{g.Rows}, {g.Cols}] does not match {g.Tokens.Length} " +
                                    $"tokens x vocab_size {m.VocabSize}; re-export it");
            byte[] raw;
            try
            {
                raw = File.ReadAllBytes(g.LogitsFile);
            }
            catch (Exception e) when (e is IOException || e is UnauthorizedAccessException)
            {
                throw new RwkvError($"cannot read the golden logits {g.LogitsFile} ({e.Message}); re-export the model");
            }
            long want = (long)g.Rows * g.Cols;
            if (raw.Length != want * 4)
                throw new RwkvError($"{g.LogitsFile} holds {raw.Length / 4.0:0.##} float32 values, golden.shape [{g.Rows}, " +
                                    $"{g.Cols}] needs {want}; re-export the model");
            if (!BitConverter.IsLittleEndian) throw new RwkvError("big-endian machines are not supported");
            var rows = new float[g.Rows][];
            for (int t = 0; t < g.Rows; t++)
            {
                rows[t] = new float[g.Cols];
                Buffer.BlockCopy(raw, t * g.Cols * 4, rows[t], 0, g.Cols * 4);
            }
            return rows;
        }

        /// <summary>Logits [T][V], one token at a time at batch 1 from the initial state, through the step graph.</summary>
        public static float[][] Score(RwkvSession session, IList<int> tokens)
        {
            var rows = new float[tokens.Count][];
            State state = session.InitialState();
            try
            {
                for (int t = 0; t < tokens.Count; t++)
                {
                    State next;
                    rows[t] = session.Step(tokens[t], state, out next);
                    state.Dispose();
                    state = next;
                }
            }
            finally
            {
                state.Dispose();
            }
            return rows;
        }

        public static CheckResult Compare(float[][] ours, float[][] golden, int[] tokens, double tolerance, double top1)
        {
            int T = golden.Length;
            var result = new CheckResult
            {
                Tokens = tokens, Distance = new double[T], Top1 = new bool[T], Tolerance = tolerance, Top1Required = top1,
            };
            for (int t = 0; t < T; t++)
            {
                float[] o = ours[t], g = golden[t];
                int V = g.Length;
                double mean = 0;
                for (int v = 0; v < V; v++) mean += g[v];
                mean /= V;
                double var = 0, maxDiff = 0, gmax = double.NegativeInfinity;
                int pick = 0;
                bool nan = false;
                for (int v = 0; v < V; v++)
                {
                    double d = g[v] - mean;
                    var += d * d;
                    double diff = Math.Abs((double)o[v] - g[v]);
                    if (double.IsNaN(diff)) nan = true;
                    else maxDiff = Math.Max(maxDiff, diff);
                    gmax = Math.Max(gmax, g[v]);
                    if (o[v] > o[pick]) pick = v;  // the first maximum, as numpy's argmax
                }
                double std = Math.Sqrt(var / V);
                result.Distance[t] = nan ? double.NaN : maxDiff / std;
                result.Top1[t] = gmax - g[pick] <= tolerance * std;
            }
            return result;
        }

        public static CheckResult Run(RwkvSession session)
        {
            var m = session.Manifest;
            var golden = ReadGolden(m);
            var ours = Score(session, m.Golden.Tokens);
            return Compare(ours, golden, m.Golden.Tokens, m.Golden.Normalised, m.Golden.Top1);
        }
    }

    /// <summary>Python's number formats, for tables that read like the Python CLI's.</summary>
    public static class Fmt
    {
        static readonly CultureInfo C = CultureInfo.InvariantCulture;

        /// <summary>Python's "{:.3g}".</summary>
        public static string G3(double d) { return G(d, 3); }

        /// <summary>Python's "{:g}" (6 significant digits).</summary>
        public static string G(double d) { return G(d, 6); }

        public static string G(double d, int digits)
        {
            if (double.IsNaN(d)) return "nan";
            if (double.IsInfinity(d)) return d > 0 ? "inf" : "-inf";
            if (d == 0) return "0";
            string e = d.ToString("E" + (digits - 1), C);  // d.ddE+xxx, rounded to `digits` significant digits
            int exp = int.Parse(e.Substring(e.IndexOf('E') + 1), C);
            if (exp < -4 || exp >= digits)
            {
                string mant = e.Substring(0, e.IndexOf('E'));
                if (mant.Contains(".")) mant = mant.TrimEnd('0').TrimEnd('.');
                return mant + "e" + (exp < 0 ? "-" : "+") + Math.Abs(exp).ToString("00", C);
            }
            string f = d.ToString("F" + Math.Max(0, digits - 1 - exp), C);
            if (f.Contains(".")) f = f.TrimEnd('0').TrimEnd('.');
            return f;
        }

        /// <summary>Python's "{:.0%}".</summary>
        public static string Percent(double share)
        {
            return Math.Round(share * 100, MidpointRounding.ToEven).ToString("0", C) + "%";
        }
    }
}
