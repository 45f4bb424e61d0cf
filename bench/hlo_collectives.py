"""Collectives of a compiled XLA program: what `bench/scale.py` reads from `as_text()`.

The optimised HLO of one SPMD partition lists every collective with its result type; operands are
named, so their types come from the instructions that define them. Ops inside a `while` body run
once per iteration: each op is scaled by the product of the known trip counts
(`backend_config={"known_trip_count":{"n":...}}`) of the loops around it; a loop without one (a
`while_loop` whose condition depends on data, such as decoding until EOS) is scaled by the
caller's bound. Traffic is estimated per device with ring algorithms.
"""

import json
import math
import re
import time

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8\w*)\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\(.*?\)|\S+)\s+([\w\-]+)\((.*)$")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"\b(body|condition|calls|to_apply|branch_computations|true_computation|"
                    r"false_computation)=\{?%?([\w.\-]+)")


def array_shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
  """Every `dtype[dims]` array type in an HLO shape string (a tuple gives several)."""
  return [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in _ARRAY.findall(text)]


def shape_bytes(shapes) -> int:
  return sum(_BYTES.get(t, 1) * math.prod(dims) for t, dims in shapes)


def group_size(attrs: str, num_devices: int) -> int:
  """Participants per replica group: mesh['a'=2,'b'=4] {'b'}, {{0,1},{2,3}} or [2,4]<=[8]; no
  groups means all devices."""
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
  if m:
    sizes = {k: int(v) for k, v in re.findall(r"'(\w+)'=(\d+)", m.group(1))}
    return math.prod(sizes[a] for a in re.findall(r"'(\w+)'", m.group(2)))
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
  if m:
    return len(m.group(1).split(","))
  m = re.search(r"replica_groups=\[([\d,]+)\]<=", attrs)
  return int(m.group(1).split(",")[-1]) if m else num_devices


def wire_bytes(kind: str, operand: int, result: int, n: int) -> float:
  """Bytes each device sends under ring algorithms (an all-reduce is a reduce-scatter plus an
  all-gather: 2 (n-1)/n of its operand)."""
  share = (n - 1) / n if n > 1 else 0.0
  return {"all-reduce": 2 * operand * share, "all-gather": result * share,
          "reduce-scatter": operand * share, "all-to-all": operand * share,
          "collective-permute": operand}[kind]


def _modules(hlo: str):
  """(entry, {computation: [(opcode, result type, rest of line)]}, {computation: [(callee,
  trip count or None for a while body without one, or 1)]}, {instruction: result type})."""
  types, comps, edges, current, entry = {}, {}, {}, None, None
  for line in hlo.splitlines():
    header = _HEADER.match(line)
    if header and not line.startswith(" "):
      current = header.group(1)
      comps[current], edges[current] = [], []
      entry = current if line.startswith("ENTRY") else entry
      continue
    m = _INSTR.match(line)
    if not m or current is None:
      continue
    name, shape, opcode, rest = m.groups()
    types[name] = shape
    comps[current].append((opcode, shape, rest))
    trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
    for attr, callee in _CALLS.findall(rest):
      loop = opcode == "while" and attr == "body"
      edges[current].append((callee, (int(trip.group(1)) if trip else None) if loop else 1))
  return entry, comps, edges, types


def parse_collectives(hlo: str, num_devices: int, batch_sizes=(), flat_sizes=(),
                      unknown_trip_count: int = 1) -> dict:
  """Collectives of an optimised HLO module.

  Returns {"ops": [...], "per_text": {kind: totals}, "scaled": {kind: totals},
  "unknown_trip_loops": int}, totals being count, operand_bytes and wire_bytes. Each op has kind,
  operand/result types and bytes, group size, wire bytes, `times` (product of the trip counts of
  the loops around it, `unknown_trip_count` for a loop without a known one) and `global_batch`:
  an all-reduce or all-gather with an operand or result whose leading dimension is in
  `batch_sizes` (global row counts) or with a dimension in `flat_sizes` (rows x positions, the
  batch flattened into a matmul's rows).
  """
  entry, comps, edges, types = _modules(hlo)
  times, unknown, stack = {entry: 1}, 0, [entry]
  while stack:  # a DAG: a computation called from two places counts for both
    comp = stack.pop()
    for callee, n in edges.get(comp, ()):
      unknown += n is None
      times[callee] = times.get(callee, 0) + times[comp] * (unknown_trip_count if n is None else n)
      stack.append(callee)
  ops = []
  for comp, instrs in comps.items():
    for opcode, shape, rest in instrs:
      kind = opcode.removesuffix("-start")
      if kind not in KINDS or comp not in times:
        continue
      args = rest.split("),")[0] if ")," in rest else rest.rsplit(")", 1)[0]
      operand = array_shapes(args) or [s for a in re.findall(r"%([\w.\-]+)", args)
                                       for s in array_shapes(types.get(a, ""))]
      result = array_shapes(shape)
      if opcode != kind and len(result) > len(operand):
        result = result[len(operand):]  # an async start returns (operands, results)
      n = group_size(rest, num_devices)
      ob, rb = shape_bytes(operand), shape_bytes(result)
      ops.append(dict(
          kind=kind, computation=comp, operand=operand, result=result, operand_bytes=ob,
          result_bytes=rb, group=n, wire_bytes=wire_bytes(kind, ob, rb, n), times=times[comp],
          global_batch=kind in ("all-reduce", "all-gather") and any(
              dims and (dims[0] in batch_sizes or set(dims) & set(flat_sizes))
              for _, dims in operand + result)))

  def totals(scale):
    return {k: {"count": sum(scale(o) for o in ops if o["kind"] == k),
                "operand_bytes": sum(o["operand_bytes"] * scale(o) for o in ops if o["kind"] == k),
                "wire_bytes": sum(o["wire_bytes"] * scale(o) for o in ops if o["kind"] == k)}
            for k in KINDS}
  return {"ops": ops, "per_text": totals(lambda o: 1), "scaled": totals(lambda o: o["times"]),
          "unknown_trip_loops": unknown}


def measure(jitted, *args, num_devices: int, **collective_kw) -> dict:
  """Lowers and compiles `jitted(*args)` (abstract args are enough): lower and compile seconds,
  per-device memory parts and total (argument + output + temp - alias), FLOPs of one partition
  (loop bodies counted once) and `parse_collectives(..., **collective_kw)`."""
  t0 = time.perf_counter()
  lowered = jitted.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  mem = compiled.memory_analysis()
  parts = {k: int(getattr(mem, f"{k}_size_in_bytes"))
           for k in ("argument", "output", "temp", "alias")}
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  return dict(lower_s=round(t1 - t0, 2), compile_s=round(t2 - t1, 2), memory=parts,
              per_device_bytes=parts["argument"] + parts["output"] + parts["temp"]
              - parts["alias"], flops=cost.get("flops"),
              collectives=parse_collectives(compiled.as_text(), num_devices, **collective_kw))


def report(res: dict) -> None:
  """Prints a `measure` result (with the caller's program, model and mesh keys) as a table, and
  as one JSON line last: what bench/README.md's tables are built from."""
  gib = lambda x: f"{x / 2 ** 30:8.2f}"
  mem, col = res["memory"], res["collectives"]
  print(f"\n== {res['program']}  {res['model']} layers={res['layers']} mesh={res['mesh']}  "
        f"lora_rank={res.get('lora_rank', 0)}  "
        f"lower {res['lower_s']} s  compile {res['compile_s']} s  flops/device "
        f"{res['flops'] or 0:.3e}")
  print("per device GiB: argument" + gib(mem["argument"]) + "  output" + gib(mem["output"])
        + "  temp" + gib(mem["temp"]) + "  alias" + gib(mem["alias"]) + "  total"
        + gib(res["per_device_bytes"]))
  print(f"{'collective':20s}{'ops(text)':>10s}{'GiB(text)':>11s}{'ops(run)':>10s}"
        f"{'wire GiB(run)':>14s}")
  for k in KINDS:
    t, s = col["per_text"][k], col["scaled"][k]
    print(f"{k:20s}{t['count']:10d}{gib(t['operand_bytes']):>11s}{s['count']:10d}"
          f"{gib(s['wire_bytes']):>14s}")
  wire = sum(s["wire_bytes"] for s in col["scaled"].values())
  print(f"wire GiB per device (run): {wire / 2 ** 30:.2f}  ideal FSDP: "
        f"{res['ideal_fsdp_wire_bytes'] / 2 ** 30:.2f}  loops without trip count: "
        f"{col['unknown_trip_loops']}")
  flagged = sorted((o for o in col["ops"] if o["global_batch"]), key=lambda o: -o["operand_bytes"])
  print(f"global-batch all-reduce/all-gather: {len(flagged)} ops, "
        f"{sum(o['operand_bytes'] * o['times'] for o in flagged) / 2 ** 30:.2f} GiB operands (run)")
  for o in flagged[:5]:
    print(f"  {o['kind']} x{o['times']}: {o['operand']} -> {o['result']}")
  summary = dict(res, collectives={
      "per_text": col["per_text"], "scaled": col["scaled"], "wire_bytes": wire,
      "unknown_trip_loops": col["unknown_trip_loops"], "global_batch_ops": len(flagged),
      "global_batch_operand_bytes": sum(o["operand_bytes"] * o["times"] for o in flagged)})
  print("JSON " + json.dumps(summary))
