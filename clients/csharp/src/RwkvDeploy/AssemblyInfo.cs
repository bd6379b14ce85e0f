// The library's version: that of the rwkv-deploy it belongs to (manifest format rwkv-deploy/2).
using System.Reflection;

[assembly: AssemblyTitle("RwkvDeploy")]
[assembly: AssemblyDescription("rwkv-deploy export folders on ONNX Runtime: manifest, state loop, tokenizers, sampling, golden check")]
[assembly: AssemblyVersion("0.1.0.0")]
