//! Graph passes: each a small named struct with one method, in its own file,
//! with the invariant it keeps stated at the top of that file.
//!
//! A pass rewrites a [`Graph`] in place and says how many rewrites it made.
//! Passes never change what a graph computes (inputs, params and outputs keep
//! their names and types); [`run_pipeline`] runs a list of them and records
//! the node counts before and after each, which `qvc compile` prints.
//!
//! Most passes are written with [`rebuild`]: walk the old graph in order and
//! emit each node into a new graph (copying it, replacing it, or mapping it to
//! an existing node), which keeps node ids topologically ordered for free.

use crate::graph::{Graph, IrError, Node, NodeId, Op};

pub mod fuse;
pub use fuse::{fusion_stats, Fuse, FusionStats};
pub mod canon;
pub mod cse;
pub mod dce;
pub mod fold;
pub mod verify;
pub use canon::Canonicalize;
pub use cse::Cse;
pub use dce::Dce;
pub use fold::{ConstFold, FoldedData, FoldedParam, WithFolded, FOLD_CAP_ELEMS};
pub use verify::{verify, Verify};

/// One graph pass.
pub trait Pass {
    fn name(&self) -> &'static str;
    /// Rewrites `g`; returns the number of rewrites (0: nothing to do).
    fn run(&self, g: &mut Graph) -> Result<usize, IrError>;
}

/// What one pass did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassStats {
    pub pass: &'static str,
    pub rewrites: usize,
    pub nodes_before: usize,
    pub nodes_after: usize,
}

/// Runs `passes` in order over `g`.
pub fn run_pipeline(g: &mut Graph, passes: &[&dyn Pass]) -> Result<Vec<PassStats>, IrError> {
    let mut stats = Vec::with_capacity(passes.len());
    for p in passes {
        let before = g.nodes.len();
        let rewrites = p.run(g)?;
        stats.push(PassStats { pass: p.name(), rewrites, nodes_before: before, nodes_after: g.nodes.len() });
    }
    Ok(stats)
}

/// Builds a new graph from `src` node by node. `f` receives the graph being
/// built, the old node's id, the old node, and its inputs already mapped to
/// new ids; it returns the new id standing for the old node (a copy made with
/// [`copy_node`], a replacement, or an existing node). Outputs are remapped.
pub fn rebuild(
    src: &Graph,
    mut f: impl FnMut(&mut Graph, NodeId, &Node, &[NodeId]) -> Result<NodeId, IrError>,
) -> Result<Graph, IrError> {
    let mut g = Graph::new();
    let mut map: Vec<NodeId> = Vec::with_capacity(src.nodes.len());
    for (i, n) in src.nodes.iter().enumerate() {
        let ins: Vec<NodeId> = n.inputs.iter().map(|x| map[x.index()]).collect();
        map.push(f(&mut g, NodeId(i as u32), n, &ins)?);
    }
    for (name, id) in &src.outputs {
        g.set_output(name, map[id.index()]);
    }
    Ok(g)
}

/// Emits a copy of `n` (with inputs `ins`) into `g`.
pub fn copy_node(g: &mut Graph, n: &Node, ins: &[NodeId]) -> Result<NodeId, IrError> {
    match &n.op {
        Op::Input(name) => Ok(g.input(name, n.ty.dtype, n.ty.shape.0.clone())),
        Op::Param(name) => Ok(g.param(name, n.ty.dtype, n.ty.shape.0.clone())),
        Op::Const(d) => g.constant(d.to_vec(), n.ty.shape.0.clone()),
        op => g.push(op.clone(), ins),
    }
}

/// For each node, the nodes that read it (in order; a node reading the same
/// input twice appears twice).
pub fn consumers(g: &Graph) -> Vec<Vec<NodeId>> {
    let mut users = vec![vec![]; g.nodes.len()];
    for (i, n) in g.nodes.iter().enumerate() {
        for x in &n.inputs {
            users[x.index()].push(NodeId(i as u32));
        }
    }
    users
}

/// Whether `id` is one of the graph's named outputs.
pub fn is_output(g: &Graph, id: NodeId) -> bool {
    g.outputs.iter().any(|(_, o)| *o == id)
}
