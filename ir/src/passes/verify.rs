//! Shape and dtype inference check: [`verify`] re-infers the type of every
//! node from its op and inputs and checks that it matches the type the node
//! carries.
//!
//! Invariant checked: every input of a node is an earlier node (topological
//! order), every non-leaf node's stored type equals the type [`Graph::push`]
//! would infer for it today, every constant holds exactly as many values as
//! its shape has elements, and every output names an existing node under a
//! unique name. Graphs built through `push` satisfy this by construction;
//! passes that edit `nodes` directly might not, so tests (and debug builds of
//! the compiler) run [`verify`] after each pass.

use super::Pass;
use crate::graph::{Graph, IrError, Op};
use crate::tensor::DType;
use std::collections::HashSet;

fn err(op: &Op, detail: String) -> IrError {
    IrError::Type { op: op.name(), detail }
}

/// Re-infers every node's type and checks the graph's structural invariants
/// (see the module doc).
pub fn verify(g: &Graph) -> Result<(), IrError> {
    // Re-push every node into a fresh graph: node ids stay the same, so
    // `push` checks both the input ordering and the inferred type.
    let mut fresh = Graph::new();
    for (i, n) in g.nodes.iter().enumerate() {
        let id = match &n.op {
            Op::Input(name) => fresh.input(name, n.ty.dtype, n.ty.shape.0.clone()),
            Op::Param(name) => fresh.param(name, n.ty.dtype, n.ty.shape.0.clone()),
            Op::Const(d) => {
                if n.ty.dtype != DType::F32 || d.len() != n.ty.shape.numel() || !n.inputs.is_empty() {
                    return Err(err(
                        &n.op,
                        format!(
                            "%{i}: {} values with {} inputs for {}{}",
                            d.len(),
                            n.inputs.len(),
                            n.ty.dtype,
                            n.ty.shape
                        ),
                    ));
                }
                // Sharing the data keeps the check cheap on large tables.
                fresh.nodes.push(n.clone());
                crate::graph::NodeId(i as u32)
            }
            op => {
                if let Some(bad) = n.inputs.iter().find(|x| x.index() >= i) {
                    return Err(err(op, format!("%{i} reads %{}, which does not come before it", bad.0)));
                }
                fresh.push(op.clone(), &n.inputs).map_err(|e| match e {
                    IrError::Type { op, detail } => IrError::Type { op, detail: format!("%{i}: {detail}") },
                    e => e,
                })?
            }
        };
        let inferred = fresh.ty(id);
        if matches!(n.op, Op::Input(_) | Op::Param(_)) && !n.inputs.is_empty() {
            return Err(err(&n.op, format!("%{i}: a leaf has inputs")));
        }
        if *inferred != n.ty {
            return Err(err(
                &n.op,
                format!(
                    "%{i} is typed {}{} but its inputs give {}{}",
                    n.ty.dtype, n.ty.shape, inferred.dtype, inferred.shape
                ),
            ));
        }
    }
    let mut names = HashSet::new();
    for (name, id) in &g.outputs {
        if id.index() >= g.nodes.len() {
            return Err(IrError::Type {
                op: "output".into(),
                detail: format!("{name:?} names missing node %{}", id.0),
            });
        }
        if !names.insert(name.as_str()) {
            return Err(IrError::Type { op: "output".into(), detail: format!("{name:?} is defined twice") });
        }
    }
    Ok(())
}

/// [`verify`] as a pass (makes no rewrites), for pipelines that want the
/// check between passes.
#[derive(Clone, Copy, Debug, Default)]
pub struct Verify;

impl Pass for Verify {
    fn name(&self) -> &'static str {
        "verify"
    }
    fn run(&self, g: &mut Graph) -> Result<usize, IrError> {
        verify(g)?;
        Ok(0)
    }
}
