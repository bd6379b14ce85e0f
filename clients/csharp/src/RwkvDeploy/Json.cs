// JSON in and out. Parsing is the platform's own parser (System.Json under mono / .NET Framework,
// System.Text.Json under .NET), converted into plain objects:
//   null, bool, string, JsonNumber, List<object> (array), Dictionary<string, object> (object).
// Writing is a few helpers: strings are escaped so that any text (lone surrogates included) survives.
using System;
using System.Collections.Generic;
using System.Globalization;
using System.Text;
#if NETCOREAPP
using System.Text.Json;
#else
using System.Json;
#endif

namespace RwkvDeploy
{
    /// <summary>A JSON number with its text, so that 64 (an integer) and 64.0 (not one) stay apart.</summary>
    public sealed class JsonNumber
    {
        public readonly string Text;
        public readonly double Value;

        public JsonNumber(string text)
        {
            Text = text;
            Value = double.Parse(text, NumberStyles.Float, CultureInfo.InvariantCulture);
        }

        /// <summary>True for an integer literal (no fraction, no exponent), as rwkv-deploy reads "integer".</summary>
        public bool IsInteger
        {
            get
            {
                int i = Text.StartsWith("-") ? 1 : 0;
                if (i >= Text.Length) return false;
                for (; i < Text.Length; i++)
                    if (Text[i] < '0' || Text[i] > '9') return false;
                return true;
            }
        }

        public override string ToString() { return Text; }
    }

    public static class Json
    {
        /// <summary>Deeper nesting than this is refused before the parser sees it (a recursive parser would
        /// overflow the stack, which no catch can handle).</summary>
        public const int MaxDepth = 256;

        /// <summary>Parse JSON text; FormatException (with the parser's message) when it is not JSON.</summary>
        public static object Parse(string text)
        {
            CheckDepth(text);
#if NETCOREAPP
            try
            {
                using (var doc = JsonDocument.Parse(text, new JsonDocumentOptions { MaxDepth = MaxDepth + 8 }))
                    return Convert(doc.RootElement);
            }
            catch (JsonException e) { throw new FormatException(e.Message); }
#else
            JsonValue root;
            try { root = JsonValue.Parse(text); }
            catch (ArgumentException e) { throw new FormatException(e.Message); }
            catch (OverflowException e) { throw new FormatException(e.Message); }
            catch (FormatException e) { throw new FormatException(e.Message); }
            if (root == null) return null;
            return Convert(root);
#endif
        }

        static void CheckDepth(string text)
        {
            int depth = 0;
            bool inString = false;
            for (int i = 0; i < text.Length; i++)
            {
                char c = text[i];
                if (inString)
                {
                    if (c == '\\') i++;
                    else if (c == '"') inString = false;
                }
                else if (c == '"') inString = true;
                else if (c == '[' || c == '{')
                {
                    if (++depth > MaxDepth) throw new FormatException($"nested deeper than {MaxDepth} levels");
                }
                else if (c == ']' || c == '}') depth--;
            }
        }

#if NETCOREAPP
        static object Convert(JsonElement e)
        {
            switch (e.ValueKind)
            {
                case JsonValueKind.Null: return null;
                case JsonValueKind.True: return true;
                case JsonValueKind.False: return false;
                case JsonValueKind.String: return e.GetString();
                case JsonValueKind.Number: return new JsonNumber(e.GetRawText());
                case JsonValueKind.Array:
                    var list = new List<object>();
                    foreach (var item in e.EnumerateArray()) list.Add(Convert(item));
                    return list;
                case JsonValueKind.Object:
                    var dict = new Dictionary<string, object>();
                    foreach (var p in e.EnumerateObject()) dict[p.Name] = Convert(p.Value);
                    return dict;
                default: throw new FormatException("unexpected JSON value kind " + e.ValueKind);
            }
        }
#else
        static object Convert(JsonValue v)
        {
            if (v == null) return null;  // System.Json represents a JSON null as a null reference
            switch (v.JsonType)
            {
                case JsonType.Boolean: return (bool)v;
                case JsonType.String: return (string)v;
                case JsonType.Number: return new JsonNumber(v.ToString());
                case JsonType.Array:
                    var list = new List<object>();
                    foreach (JsonValue item in (JsonArray)v) list.Add(Convert(item));
                    return list;
                case JsonType.Object:
                    var dict = new Dictionary<string, object>();
                    foreach (var p in (JsonObject)v) dict[p.Key] = Convert(p.Value);
                    return dict;
                default: throw new FormatException("unexpected JSON value type " + v.JsonType);
            }
        }
#endif

        /// <summary>What a parsed value is, in JSON's words (for error messages).</summary>
        public static string TypeName(object v)
        {
            if (v == null) return "null";
            if (v is bool) return "boolean";
            if (v is string) return "string";
            if (v is JsonNumber) return "number";
            if (v is List<object>) return "array";
            if (v is Dictionary<string, object>) return "object";
            return v.GetType().Name;
        }

        /// <summary>A short rendering of a parsed value for error messages.</summary>
        public static string Show(object v)
        {
            var sb = new StringBuilder();
            Write(sb, v, 3);
            return sb.Length > 80 ? sb.ToString(0, 77) + "..." : sb.ToString();
        }

        static void Write(StringBuilder sb, object v, int depth)
        {
            if (v == null) sb.Append("null");
            else if (v is bool) sb.Append((bool)v ? "true" : "false");
            else if (v is string) Quote(sb, (string)v);
            else if (v is JsonNumber) sb.Append(((JsonNumber)v).Text);
            else if (v is List<object>)
            {
                if (depth == 0) { sb.Append("[...]"); return; }
                sb.Append('[');
                var list = (List<object>)v;
                for (int i = 0; i < list.Count; i++) { if (i > 0) sb.Append(", "); Write(sb, list[i], depth - 1); }
                sb.Append(']');
            }
            else if (v is Dictionary<string, object>)
            {
                if (depth == 0) { sb.Append("{...}"); return; }
                sb.Append('{');
                bool first = true;
                foreach (var p in (Dictionary<string, object>)v)
                {
                    if (!first) sb.Append(", ");
                    first = false;
                    Quote(sb, p.Key);
                    sb.Append(": ");
                    Write(sb, p.Value, depth - 1);
                }
                sb.Append('}');
            }
            else sb.Append(v);
        }

        /// <summary>Append s as a JSON string. Everything outside printable ASCII is a \u escape, so the output
        /// is ASCII and every UTF-16 unit (a lone surrogate too) comes back exactly.</summary>
        public static StringBuilder Quote(StringBuilder sb, string s)
        {
            sb.Append('"');
            foreach (char c in s)
            {
                if (c == '"') sb.Append("\\\"");
                else if (c == '\\') sb.Append("\\\\");
                else if (c == '\n') sb.Append("\\n");
                else if (c == '\r') sb.Append("\\r");
                else if (c == '\t') sb.Append("\\t");
                else if (c < 0x20 || c > 0x7e) sb.Append("\\u").Append(((int)c).ToString("x4"));
                else sb.Append(c);
            }
            return sb.Append('"');
        }

        public static string Quote(string s)
        {
            var sb = new StringBuilder();
            Quote(sb, s);
            return sb.ToString();
        }

        /// <summary>A float32 as JSON text that reads back exactly, as a float32 or as a float64: the float widened to
        /// double (exact) with 17 significant digits (which round-trip any double; "R" does not always under .NET
        /// Framework and mono). NaN and the infinities are written as Python's json module writes them.</summary>
        public static string Float(float f)
        {
            if (float.IsNaN(f)) return "NaN";
            if (float.IsPositiveInfinity(f)) return "Infinity";
            if (float.IsNegativeInfinity(f)) return "-Infinity";
            return ((double)f).ToString("G17", CultureInfo.InvariantCulture);
        }
    }
}
