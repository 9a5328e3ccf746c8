//! Dead-code elimination.
//!
//! Invariant: after [`Dce`] every node is an output or is read, directly or
//! transitively, by an output; outputs keep their names and compute the same
//! values. Unread leaves go too: an `Input` nobody reads is no longer an
//! input of the program (backends look inputs up by the graph's own nodes,
//! so a caller that still supplies it is unaffected), and an unread `Param`
//! is no longer a weight the program needs, which is what lets the compiler
//! drop the original of a weight that folding repacked.

use super::{copy_node, rebuild, Pass};
use crate::graph::{Graph, IrError, NodeId};

/// Removes every node no output depends on (leaves included).
#[derive(Clone, Copy, Debug, Default)]
pub struct Dce;

/// For each node, whether some output depends on it.
pub fn live_nodes(g: &Graph) -> Vec<bool> {
    let mut live = vec![false; g.nodes.len()];
    for (_, o) in &g.outputs {
        live[o.index()] = true;
    }
    // Inputs point backwards, so one reverse sweep reaches everything.
    for i in (0..g.nodes.len()).rev() {
        if live[i] {
            for x in &g.nodes[i].inputs {
                live[x.index()] = true;
            }
        }
    }
    live
}

impl Pass for Dce {
    fn name(&self) -> &'static str {
        "dce"
    }
    fn run(&self, g: &mut Graph) -> Result<usize, IrError> {
        let live = live_nodes(g);
        let dead = live.iter().filter(|l| !**l).count();
        if dead == 0 {
            return Ok(0);
        }
        *g = rebuild(g, |ng, id, n, ins| {
            if live[id.index()] {
                copy_node(ng, n, ins)
            } else {
                // Never read: only dead nodes read dead nodes.
                Ok(NodeId(u32::MAX))
            }
        })?;
        Ok(dead)
    }
}
