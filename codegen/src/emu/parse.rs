//! PTX text → the [`crate::ptx`] data model.
//!
//! Reads exactly the subset the printer writes (header directives, `.entry`
//! with `.param`s, optional `.maxntid`, `.reg`/`.shared` declarations, labels,
//! `//` comments and one instruction per line), so `parse(print(k))` gives
//! back `k`. Invariants checked here, with the line number: every register
//! is declared (`id < N` of its `.reg` line) and every branch target is a
//! label of the same kernel. Opcodes are not interpreted here (the decoder
//! does that), so an unknown opcode parses and fails at launch.

use std::collections::HashSet;

use super::{EmuError, EmuErrorKind};
use crate::ptx::*;

fn perr(kernel: &str, line: usize, msg: impl Into<String>) -> EmuError {
    EmuError::new(kernel, EmuErrorKind::Parse { line, msg: msg.into() }, "")
}

/// Returns the `.target` name and the kernels.
pub(crate) fn parse_module(text: &str) -> Result<(String, Vec<Kernel>), EmuError> {
    let lines: Vec<(usize, &str)> = text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())).collect();
    let mut target = String::new();
    let mut kernels = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let (ln, l) = lines[i];
        if l.is_empty() || l.starts_with("//") {
            i += 1;
        } else if let Some(v) = l.strip_prefix(".version") {
            let v = v.trim();
            if v.split('.').count() != 2
                || !v.split('.').all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            {
                return Err(perr("", ln, format!("bad .version `{v}`")));
            }
            i += 1;
        } else if let Some(t) = l.strip_prefix(".target") {
            target = t.trim().to_string();
            if !target.starts_with("sm_") {
                return Err(perr("", ln, format!("bad .target `{target}`")));
            }
            i += 1;
        } else if let Some(a) = l.strip_prefix(".address_size") {
            if a.trim() != "64" {
                return Err(perr("", ln, "only .address_size 64 is supported"));
            }
            i += 1;
        } else if l.starts_with(".visible .entry") || l.starts_with(".entry") {
            let (k, next) = parse_kernel(&lines, i)?;
            if kernels.iter().any(|o: &Kernel| o.name == k.name) {
                return Err(perr(&k.name, ln, "duplicate kernel name"));
            }
            kernels.push(k);
            i = next;
        } else {
            return Err(perr("", ln, format!("unexpected `{l}`")));
        }
    }
    Ok((target, kernels))
}

/// Parses one `.entry` starting at `lines[start]`; returns it and the index
/// of the line after its closing `}`.
fn parse_kernel(lines: &[(usize, &str)], start: usize) -> Result<(Kernel, usize), EmuError> {
    let ln0 = lines[start].0;
    // The header runs up to the `{` line.
    let mut header = String::new();
    let mut i = start;
    loop {
        let Some(&(_, l)) = lines.get(i) else {
            return Err(perr("", ln0, "kernel header without a `{`"));
        };
        i += 1;
        if l == "{" {
            break;
        }
        header.push_str(l);
        header.push(' ');
    }
    let after_entry = header.split_once(".entry").map(|(_, r)| r).unwrap_or("");
    let (name, rest) =
        after_entry.split_once('(').ok_or_else(|| perr("", ln0, "expected `(` after the kernel name"))?;
    let name = name.trim().to_string();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$') {
        return Err(perr("", ln0, format!("bad kernel name `{name}`")));
    }
    let (plist, tail) = rest.split_once(')').ok_or_else(|| perr(&name, ln0, "expected `)` after the params"))?;
    let mut params = Vec::new();
    for p in plist.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let toks: Vec<&str> = p.split_whitespace().collect();
        let ty = match toks.as_slice() {
            [".param", t, _] => t.strip_prefix('.').and_then(Ty::parse),
            _ => None,
        };
        let ty = ty.ok_or_else(|| perr(&name, ln0, format!("bad param `{p}`")))?;
        params.push(Param { name: toks[2].to_string(), ty });
    }
    let tail = tail.trim();
    let max_threads = if tail.is_empty() {
        None
    } else if let Some(m) = tail.strip_prefix(".maxntid") {
        let mut prod = 1u32;
        for d in m.split(',') {
            let v: u32 = d.trim().parse().map_err(|_| perr(&name, ln0, format!("bad .maxntid `{m}`")))?;
            prod = prod.saturating_mul(v);
        }
        Some(prod)
    } else {
        return Err(perr(&name, ln0, format!("unexpected `{tail}` after the params")));
    };

    let mut k = Kernel { name: name.clone(), params, shared: vec![], regs: [0; 6], max_threads, body: vec![] };
    let mut branch_targets: Vec<(usize, String)> = Vec::new();
    loop {
        let Some(&(ln, l)) = lines.get(i) else {
            return Err(perr(&name, ln0, "kernel body without a closing `}`"));
        };
        i += 1;
        if l == "}" {
            break;
        }
        if l.is_empty() {
            continue;
        }
        if let Some(c) = l.strip_prefix("//") {
            k.body.push(Stmt::Comment(c.strip_prefix(' ').unwrap_or(c).to_string()));
        } else if let Some(r) = l.strip_prefix(".reg") {
            parse_reg_decl(&mut k, r, ln)?;
        } else if let Some(r) = l.strip_prefix(".shared") {
            parse_shared_decl(&mut k, r, ln)?;
        } else if let Some(lab) = l.strip_suffix(':') {
            if lab.is_empty() || !lab.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$') {
                return Err(perr(&name, ln, format!("bad label `{lab}`")));
            }
            k.body.push(Stmt::Label(lab.to_string()));
        } else {
            let ins = parse_instr(&k, l, ln)?;
            for a in &ins.args {
                if let Operand::Label(t) = a {
                    branch_targets.push((ln, t.clone()));
                }
            }
            k.body.push(Stmt::Instr(ins));
        }
    }
    let labels: HashSet<&str> =
        k.body.iter().filter_map(|s| if let Stmt::Label(l) = s { Some(l.as_str()) } else { None }).collect();
    for (ln, t) in &branch_targets {
        if !labels.contains(t.as_str()) {
            return Err(perr(&name, *ln, format!("branch to undefined label `{t}`")));
        }
    }
    Ok((k, i))
}

fn class_of_prefix(p: &str) -> Option<RegClass> {
    RegClass::ALL.into_iter().find(|c| c.prefix() == p)
}

/// `.reg .b32 %r<12>;` (the `.reg` already stripped).
fn parse_reg_decl(k: &mut Kernel, r: &str, ln: usize) -> Result<(), EmuError> {
    let bad = || perr(&k.name, ln, format!("bad register declaration `.reg{r}`"));
    let r = r.trim().strip_suffix(';').ok_or_else(bad)?;
    let toks: Vec<&str> = r.split_whitespace().collect();
    let [ty, decl] = toks.as_slice() else { return Err(bad()) };
    let ty = ty.strip_prefix('.').and_then(Ty::parse).ok_or_else(bad)?;
    let decl = decl.strip_prefix('%').ok_or_else(bad)?;
    let (pre, n) = decl.split_once('<').ok_or_else(bad)?;
    let n: u32 = n.strip_suffix('>').and_then(|n| n.parse().ok()).ok_or_else(bad)?;
    let class = class_of_prefix(pre).ok_or_else(bad)?;
    if class.decl_ty() != ty {
        return Err(perr(&k.name, ln, format!("%{pre} registers must be declared .{}", class.decl_ty())));
    }
    k.regs[class.index()] = n;
    Ok(())
}

/// `.shared .align 16 .b8 smem[2048];` (the `.shared` already stripped).
fn parse_shared_decl(k: &mut Kernel, r: &str, ln: usize) -> Result<(), EmuError> {
    let bad = || perr(&k.name, ln, format!("bad shared declaration `.shared{r}` (only `.align A .b8 name[N]`)"));
    let r = r.trim().strip_suffix(';').ok_or_else(bad)?;
    let toks: Vec<&str> = r.split_whitespace().collect();
    let [".align", a, ".b8", decl] = toks.as_slice() else { return Err(bad()) };
    let align: u32 = a.parse().map_err(|_| bad())?;
    if !align.is_power_of_two() {
        return Err(bad());
    }
    let (nm, n) = decl.split_once('[').ok_or_else(bad)?;
    let bytes: u32 = n.strip_suffix(']').and_then(|n| n.parse().ok()).ok_or_else(bad)?;
    if nm.is_empty() || bytes == 0 {
        return Err(bad());
    }
    k.shared.push(Shared { name: nm.to_string(), align, bytes });
    Ok(())
}

fn parse_instr(k: &Kernel, l: &str, ln: usize) -> Result<Instr, EmuError> {
    let err = |msg: String| perr(&k.name, ln, msg);
    let l = match l.find("//") {
        Some(c) => l[..c].trim_end(),
        None => l,
    };
    let s = l.strip_suffix(';').ok_or_else(|| err(format!("expected `;` at the end of `{l}`")))?.trim();
    let (guard, s) = if let Some(g) = s.strip_prefix('@') {
        let (g, rest) =
            g.split_once(char::is_whitespace).ok_or_else(|| err(format!("guard without instruction `{l}`")))?;
        let (negate, g) = match g.strip_prefix('!') {
            Some(g) => (true, g),
            None => (false, g),
        };
        let pred = parse_reg(k, g, ln)?;
        if pred.class != RegClass::Pred {
            return Err(err(format!("guard `{g}` is not a predicate")));
        }
        (Some(Guard { pred, negate }), rest.trim())
    } else {
        (None, s)
    };
    let (op, rest) = match s.split_once(char::is_whitespace) {
        Some((o, r)) => (o, r.trim()),
        None => (s, ""),
    };
    if op.is_empty() || !op.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == ':') {
        return Err(err(format!("bad opcode `{op}`")));
    }
    let is_branch = op == "bra" || op.starts_with("bra.");
    let mut args = Vec::new();
    for a in split_top_level(rest).map_err(err)? {
        args.push(parse_operand(k, a, is_branch, ln)?);
    }
    Ok(Instr { guard, op: op.to_string(), args })
}

/// Splits at commas outside `{}` and `[]`.
fn split_top_level(s: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    if s.is_empty() {
        return Ok(out);
    }
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '{' | '[' => depth += 1,
            '}' | ']' => depth -= 1,
            ',' if depth == 0 => {
                out.push(s[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
        if depth < 0 {
            return Err(format!("unbalanced brackets in `{s}`"));
        }
    }
    if depth != 0 {
        return Err(format!("unbalanced brackets in `{s}`"));
    }
    out.push(s[start..].trim());
    if out.iter().any(|a| a.is_empty()) {
        return Err(format!("empty operand in `{s}`"));
    }
    Ok(out)
}

fn parse_reg(k: &Kernel, s: &str, ln: usize) -> Result<Reg, EmuError> {
    let bad = || perr(&k.name, ln, format!("bad register `{s}`"));
    let body = s.strip_prefix('%').ok_or_else(bad)?;
    let split = body.find(|c: char| c.is_ascii_digit()).ok_or_else(bad)?;
    let (pre, id) = body.split_at(split);
    let class = class_of_prefix(pre).ok_or_else(bad)?;
    let id: u32 = id.parse().map_err(|_| bad())?;
    if id >= k.regs[class.index()] {
        return Err(perr(
            &k.name,
            ln,
            format!("register `{s}` is not declared (have %{pre}<{}>)", k.regs[class.index()]),
        ));
    }
    Ok(Reg { class, id })
}

fn parse_int(s: &str) -> Option<i64> {
    let (neg, t) = match s.strip_prefix('-') {
        Some(t) => (true, t),
        None => (false, s),
    };
    let v = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()? as i64
    } else {
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        t.parse::<u64>().ok()? as i64
    };
    Some(if neg { v.wrapping_neg() } else { v })
}

fn is_ident(s: &str) -> bool {
    let mut cs = s.chars();
    cs.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == '$')
        && cs.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
}

fn parse_operand(k: &Kernel, s: &str, is_branch: bool, ln: usize) -> Result<Operand, EmuError> {
    let bad = || perr(&k.name, ln, format!("bad operand `{s}`"));
    if let Some(inner) = s.strip_prefix('{') {
        let inner = inner.strip_suffix('}').ok_or_else(bad)?;
        let regs = inner.split(',').map(|r| parse_reg(k, r.trim(), ln)).collect::<Result<Vec<_>, _>>()?;
        return Ok(Operand::Vec(regs));
    }
    if let Some(inner) = s.strip_prefix('[') {
        let inner = inner.strip_suffix(']').ok_or_else(bad)?.trim();
        // `[base]`, `[base+off]`, `[base+-off]`, `[base-off]`.
        let (base, off) = match inner.find(['+', '-']) {
            Some(p) => {
                let off = if inner[p..].starts_with('+') { &inner[p + 1..] } else { &inner[p..] };
                (inner[..p].trim(), parse_int(off.trim()).ok_or_else(bad)?)
            }
            None => (inner, 0),
        };
        let base = if base.starts_with('%') {
            AddrBase::Reg(parse_reg(k, base, ln)?)
        } else if is_ident(base) {
            AddrBase::Sym(base.to_string())
        } else {
            return Err(bad());
        };
        return Ok(Operand::Addr(Addr { base, offset: off }));
    }
    if s.starts_with('%') {
        if let Some(sr) = Sreg::parse(s) {
            return Ok(Operand::Special(sr));
        }
        return Ok(Operand::Reg(parse_reg(k, s, ln)?));
    }
    if let Some(h) = s.strip_prefix("0f").or_else(|| s.strip_prefix("0F")) {
        if h.len() != 8 {
            return Err(bad());
        }
        let bits = u32::from_str_radix(h, 16).map_err(|_| bad())?;
        return Ok(Operand::F32(f32::from_bits(bits)));
    }
    if let Some(v) = parse_int(s) {
        return Ok(Operand::Imm(v));
    }
    if is_ident(s) {
        return Ok(if is_branch { Operand::Label(s.to_string()) } else { Operand::Sym(s.to_string()) });
    }
    Err(bad())
}
