//! The subset of Python's pickle that verification `.bin` files use, read and written.
//!
//! insightface's sets are `pickle.dump((bins, issame_list))`: a list of encoded images (`str` in
//! Python 2, `bytes` in Python 3, or numpy uint8 arrays) and a list of bools (or a numpy bool
//! array), with protocols 2 to 5. This reader runs the pickle machine for the opcodes those
//! files contain and rebuilds numpy arrays from `numpy.core.multiarray._reconstruct` + BUILD.

use std::collections::HashMap;

/// A decoded pickle value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Bytes(Vec<u8>),
    Str(String),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    /// `module.name`, as referenced by GLOBAL / STACK_GLOBAL.
    Global(String, String),
    /// A callable applied to arguments (REDUCE), possibly updated with a state (BUILD).
    Object {
        callable: Box<Value>,
        args: Box<Value>,
        state: Option<Box<Value>>,
    },
    Mark,
}

/// Containers nest at most this deep: insightface's sets nest four deep (tuple, list, numpy
/// array, dtype), and deeper values would overflow the stack when dropped.
pub const MAX_DEPTH: usize = 64;

/// Bytes (and containers, 16 bytes each) that memo lookups may copy beyond the file's own size:
/// a pickle references a memoised value instead of repeating it, so a few bytes of GET + APPEND
/// can double a value each time; a `.bin` only ever references small values (globals, dtypes).
const MEMO_COPY_ALLOWANCE: usize = 1 << 20;

/// Whether `value` nests containers at most `limit` deep.
fn nests_within(value: &Value, limit: usize) -> bool {
    let children: Box<dyn Iterator<Item = &Value>> = match value {
        Value::List(items) | Value::Tuple(items) => Box::new(items.iter()),
        Value::Dict(pairs) => Box::new(pairs.iter().flat_map(|(k, v)| [k, v])),
        Value::Object {
            callable,
            args,
            state,
        } => Box::new(
            [callable.as_ref(), args.as_ref()]
                .into_iter()
                .chain(state.as_deref()),
        ),
        _ => return true,
    };
    limit > 0 && children.into_iter().all(|c| nests_within(c, limit - 1))
}

/// The memory a copy of `value` takes, roughly (payload bytes, 16 per node), counted only up to
/// `cap`.
fn weight(value: &Value, cap: usize) -> usize {
    let mut total = 0usize;
    let mut pending = vec![value];
    while let Some(v) = pending.pop() {
        total += 16;
        match v {
            Value::Bytes(b) => total += b.len(),
            Value::Str(s) => total += s.len(),
            Value::Global(m, n) => total += m.len() + n.len(),
            Value::List(items) | Value::Tuple(items) => pending.extend(items),
            Value::Dict(pairs) => pending.extend(pairs.iter().flat_map(|(k, v)| [k, v])),
            Value::Object {
                callable,
                args,
                state,
            } => {
                pending.extend([callable.as_ref(), args.as_ref()]);
                pending.extend(state.as_deref());
            }
            Value::None | Value::Bool(_) | Value::Int(_) | Value::Mark => {}
        }
        if total > cap {
            break;
        }
    }
    total
}

/// A pickle that cannot be decoded: what is wrong and at which byte.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PickleError(pub String);

/// Decode a pickle; errors name the byte offset. Memory stays within a small multiple of the
/// file's size and nesting within [`MAX_DEPTH`], whatever the bytes say.
pub fn load(data: &[u8]) -> Result<Value, PickleError> {
    decode(data).map_err(PickleError)
}

fn decode(data: &[u8]) -> Result<Value, String> {
    let mut stack: Vec<Value> = Vec::new();
    let mut memo: HashMap<u32, Value> = HashMap::new();
    let mut pos = 0usize;
    let mut copy_budget = data.len().saturating_add(MEMO_COPY_ALLOWANCE);
    let too_deep = |items: &[Value], at: usize| -> Result<(), String> {
        match items.iter().all(|item| nests_within(item, MAX_DEPTH - 1)) {
            true => Ok(()),
            false => Err(format!(
                "values nested more than {MAX_DEPTH} deep at byte {at}"
            )),
        }
    };
    let take = |pos: &mut usize, n: usize| -> Result<&[u8], String> {
        let end = pos
            .checked_add(n)
            .filter(|e| *e <= data.len())
            .ok_or(format!("truncated at byte {}: needs {n} more bytes", *pos))?;
        let s = &data[*pos..end];
        *pos = end;
        Ok(s)
    };
    let le = |b: &[u8]| b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | x as u64);
    let pop_mark = |stack: &mut Vec<Value>, at: usize| -> Result<Vec<Value>, String> {
        let mark = stack
            .iter()
            .rposition(|v| *v == Value::Mark)
            .ok_or(format!("no MARK before byte {at}"))?;
        let items = stack.split_off(mark + 1);
        stack.pop();
        Ok(items)
    };
    loop {
        let at = pos;
        let op = *take(&mut pos, 1)?.first().unwrap();
        let underflow = || format!("stack underflow at byte {at} (opcode 0x{op:02x})");
        match op {
            0x80 => {
                take(&mut pos, 1)?; // PROTO
            }
            0x95 => {
                take(&mut pos, 8)?; // FRAME
            }
            b'.' => return stack.pop().ok_or_else(underflow),
            b'(' => stack.push(Value::Mark),
            b']' => stack.push(Value::List(Vec::new())),
            b')' => stack.push(Value::Tuple(Vec::new())),
            b'}' => stack.push(Value::Dict(Vec::new())),
            b'N' => stack.push(Value::None),
            0x88 => stack.push(Value::Bool(true)),
            0x89 => stack.push(Value::Bool(false)),
            b'J' => stack.push(Value::Int(le(take(&mut pos, 4)?) as u32 as i32 as i64)),
            b'K' => stack.push(Value::Int(le(take(&mut pos, 1)?) as i64)),
            b'M' => stack.push(Value::Int(le(take(&mut pos, 2)?) as i64)),
            0x8a => {
                // LONG1: little-endian two's complement
                let n = le(take(&mut pos, 1)?) as usize;
                let bytes = take(&mut pos, n)?;
                let mut v = le(bytes) as i64;
                if n > 0 && n < 8 && bytes[n - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * n);
                }
                stack.push(Value::Int(v));
            }
            b'C' | b'U' => {
                // SHORT_BINBYTES, SHORT_BINSTRING (Python 2 str = bytes)
                let n = le(take(&mut pos, 1)?) as usize;
                stack.push(Value::Bytes(take(&mut pos, n)?.to_vec()));
            }
            b'B' | b'T' => {
                let n = le(take(&mut pos, 4)?) as usize;
                stack.push(Value::Bytes(take(&mut pos, n)?.to_vec()));
            }
            0x8e | 0x96 => {
                // BINBYTES8, BYTEARRAY8
                let n = le(take(&mut pos, 8)?) as usize;
                stack.push(Value::Bytes(take(&mut pos, n)?.to_vec()));
            }
            0x8c | b'X' | 0x8d => {
                // SHORT_BINUNICODE, BINUNICODE, BINUNICODE8
                let width = match op {
                    0x8c => 1,
                    b'X' => 4,
                    _ => 8,
                };
                let n = le(take(&mut pos, width)?) as usize;
                let text = String::from_utf8(take(&mut pos, n)?.to_vec())
                    .map_err(|_| format!("invalid UTF-8 string at byte {at}"))?;
                stack.push(Value::Str(text));
            }
            0x94 => {
                let top = stack.last().ok_or_else(underflow)?.clone();
                memo.insert(memo.len() as u32, top);
            }
            b'q' | b'r' => {
                let n = le(take(&mut pos, if op == b'q' { 1 } else { 4 })?) as u32;
                memo.insert(n, stack.last().ok_or_else(underflow)?.clone());
            }
            b'h' | b'j' => {
                let n = le(take(&mut pos, if op == b'h' { 1 } else { 4 })?) as u32;
                let value = memo.get(&n).ok_or(format!("memo {n} unset at byte {at}"))?;
                let cost = weight(value, copy_budget.saturating_add(1));
                copy_budget = copy_budget.checked_sub(cost).ok_or(format!(
                    "memo {n} referenced at byte {at} would copy more than the file holds \
                     (a pickle that grows without bound)"
                ))?;
                stack.push(value.clone());
            }
            b'a' => {
                let item = stack.pop().ok_or_else(underflow)?;
                too_deep(std::slice::from_ref(&item), at)?;
                match stack.last_mut() {
                    Some(Value::List(list)) => list.push(item),
                    _ => return Err(format!("APPEND to a non-list at byte {at}")),
                }
            }
            b'e' => {
                let items = pop_mark(&mut stack, at)?;
                too_deep(&items, at)?;
                match stack.last_mut() {
                    Some(Value::List(list)) => list.extend(items),
                    _ => return Err(format!("APPENDS to a non-list at byte {at}")),
                }
            }
            b't' => {
                let items = pop_mark(&mut stack, at)?;
                too_deep(&items, at)?;
                stack.push(Value::Tuple(items));
            }
            b'l' => {
                let items = pop_mark(&mut stack, at)?;
                too_deep(&items, at)?;
                stack.push(Value::List(items));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    return Err(underflow());
                }
                let items = stack.split_off(stack.len() - n);
                too_deep(&items, at)?;
                stack.push(Value::Tuple(items));
            }
            b's' | b'u' => {
                let items = if op == b's' {
                    let v = stack.pop().ok_or_else(underflow)?;
                    let k = stack.pop().ok_or_else(underflow)?;
                    vec![k, v]
                } else {
                    pop_mark(&mut stack, at)?
                };
                too_deep(&items, at)?;
                match stack.last_mut() {
                    Some(Value::Dict(d)) => {
                        for pair in items.chunks(2) {
                            if let [k, v] = pair {
                                d.push((k.clone(), v.clone()));
                            }
                        }
                    }
                    _ => return Err(format!("SETITEM on a non-dict at byte {at}")),
                }
            }
            b'c' => {
                let line = |pos: &mut usize| -> Result<String, String> {
                    let rest = &data[*pos..];
                    let end = rest
                        .iter()
                        .position(|&b| b == b'\n')
                        .ok_or(format!("unterminated GLOBAL at byte {at}"))?;
                    *pos += end + 1;
                    Ok(String::from_utf8_lossy(&rest[..end]).into_owned())
                };
                let module = line(&mut pos)?;
                let name = line(&mut pos)?;
                stack.push(Value::Global(module, name));
            }
            0x93 => {
                let name = stack.pop().ok_or_else(underflow)?;
                let module = stack.pop().ok_or_else(underflow)?;
                match (module, name) {
                    (Value::Str(m), Value::Str(n)) => stack.push(Value::Global(m, n)),
                    _ => return Err(format!("STACK_GLOBAL without names at byte {at}")),
                }
            }
            b'R' | 0x81 => {
                // REDUCE, NEWOBJ
                let args = stack.pop().ok_or_else(underflow)?;
                let callable = stack.pop().ok_or_else(underflow)?;
                too_deep(std::slice::from_ref(&args), at)?;
                too_deep(std::slice::from_ref(&callable), at)?;
                stack.push(Value::Object {
                    callable: Box::new(callable),
                    args: Box::new(args),
                    state: None,
                });
            }
            b'b' => {
                let state_value = stack.pop().ok_or_else(underflow)?;
                too_deep(std::slice::from_ref(&state_value), at)?;
                match stack.last_mut() {
                    Some(Value::Object { state, .. }) => *state = Some(Box::new(state_value)),
                    _ => return Err(format!("BUILD on a non-object at byte {at}")),
                }
            }
            other => {
                return Err(format!(
                    "unsupported pickle opcode 0x{other:02x} at byte {at}"
                ))
            }
        }
    }
}

/// A numpy array rebuilt from its pickle: element type code (`u1`, `b1`, ...), shape, raw bytes.
pub fn numpy_array(value: &Value) -> Option<(String, Vec<usize>, Vec<u8>)> {
    let Value::Object {
        callable, state, ..
    } = value
    else {
        return None;
    };
    match callable.as_ref() {
        Value::Global(m, n) if m.starts_with("numpy") && n == "_reconstruct" => {}
        _ => return None,
    }
    // state = (version, shape, dtype, is_fortran, raw bytes)
    let Value::Tuple(state) = state.as_deref()? else {
        return None;
    };
    let [_, Value::Tuple(shape), dtype, _, raw] = state.as_slice() else {
        return None;
    };
    let raw = bytes_of(raw)?;
    let shape = shape
        .iter()
        .map(|d| match d {
            Value::Int(n) => Some(*n as usize),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()?;
    let Value::Object { args, .. } = dtype else {
        return None;
    };
    let Value::Tuple(dargs) = args.as_ref() else {
        return None;
    };
    let code = match dargs.first()? {
        Value::Str(s) => s.clone(),
        Value::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
        _ => return None,
    };
    Some((code, shape, raw))
}

/// Byte payloads: `bytes`, Python 2 `str` (read as bytes), and Python 3 bytes pickled at
/// protocol 2, which arrive as `_codecs.encode(latin-1 text, "latin1")`.
pub fn bytes_of(value: &Value) -> Option<Vec<u8>> {
    match value {
        Value::Bytes(b) => Some(b.clone()),
        Value::Object { callable, args, .. }
            if **callable == Value::Global("_codecs".into(), "encode".into()) =>
        {
            match args.as_ref() {
                Value::Tuple(a) => match a.first() {
                    Some(Value::Str(s)) => Some(s.chars().map(|c| c as u32 as u8).collect()),
                    _ => None,
                },
                _ => None,
            }
        }
        _ => None,
    }
}

/// Pickle (protocol 4) of `(list of bytes, list of bools)`, the layout of insightface `.bin`s.
pub fn dump_bin(images: &[Vec<u8>], issame: &[bool]) -> Vec<u8> {
    let mut out = vec![0x80, 4];
    out.push(b']');
    out.push(b'(');
    for image in images {
        if image.len() < 256 {
            out.push(b'C');
            out.push(image.len() as u8);
        } else {
            out.push(b'B');
            out.extend_from_slice(&(image.len() as u32).to_le_bytes());
        }
        out.extend_from_slice(image);
    }
    out.push(b'e');
    out.push(b']');
    out.push(b'(');
    for &same in issame {
        out.push(if same { 0x88 } else { 0x89 });
    }
    out.push(b'e');
    out.push(0x86);
    out.push(b'.');
    out
}
