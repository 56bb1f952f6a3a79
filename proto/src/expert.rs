//! Domain types of the expert data plane, built from messages once and
//! trusted afterwards.

use crate::{ProtocolError, pb, tensor};

/// A decoder layer's index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LayerId(pub u32);

/// A routed expert's index within its layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExpertId(pub u32);

/// Tokens of one layer to run through some hosted experts.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertBatch {
    pub layer: LayerId,
    /// Width of each token's hidden state.
    pub width: usize,
    /// `[tokens, width]` MoE inputs.
    pub hidden: Vec<f32>,
    /// Per token, its `(expert, weight)` pairs for this worker.
    pub routes: Vec<Vec<(ExpertId, f32)>>,
}

impl ExpertBatch {
    pub fn tokens(&self) -> usize {
        self.routes.len()
    }

    pub fn pairs(&self) -> usize {
        self.routes.iter().map(Vec::len).sum()
    }
}

impl TryFrom<pb::RunExpertsRequest> for ExpertBatch {
    type Error = ProtocolError;

    fn try_from(m: pb::RunExpertsRequest) -> Result<Self, ProtocolError> {
        let (rows, width, hidden) = tensor::decode(m.hidden.as_ref(), "hidden")?;
        if m.route_counts.len() != rows {
            return Err(ProtocolError(format!("{} route counts for {rows} tokens", m.route_counts.len())));
        }
        let pairs: u64 = m.route_counts.iter().map(|&c| u64::from(c)).sum();
        if pairs != m.experts.len() as u64 || pairs != m.weights.len() as u64 {
            return Err(ProtocolError(format!(
                "route counts add up to {pairs} but there are {} experts and {} weights",
                m.experts.len(),
                m.weights.len()
            )));
        }
        if let Some(w) = m.weights.iter().find(|w| !w.is_finite()) {
            return Err(ProtocolError(format!("routing weight {w} is not finite")));
        }
        let mut pairs = m.experts.iter().zip(&m.weights);
        let routes = m
            .route_counts
            .iter()
            .map(|&count| pairs.by_ref().take(count as usize).map(|(&e, &w)| (ExpertId(e), w)).collect())
            .collect();
        Ok(ExpertBatch { layer: LayerId(m.layer), width, hidden, routes })
    }
}

impl From<ExpertBatch> for pb::RunExpertsRequest {
    fn from(b: ExpertBatch) -> Self {
        let rows = b.routes.len();
        pb::RunExpertsRequest {
            layer: b.layer.0,
            route_counts: b.routes.iter().map(|r| r.len() as u32).collect(),
            experts: b.routes.iter().flatten().map(|(e, _)| e.0).collect(),
            weights: b.routes.iter().flatten().map(|(_, w)| *w).collect(),
            hidden: Some(tensor::encode(rows, b.width, b.hidden)),
        }
    }
}

/// `[pairs, width]` weighted expert outputs, in the request's pair order.
#[derive(Debug, Clone, PartialEq)]
pub struct Contributions {
    pub pairs: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

impl TryFrom<pb::RunExpertsResponse> for Contributions {
    type Error = ProtocolError;

    fn try_from(m: pb::RunExpertsResponse) -> Result<Self, ProtocolError> {
        let (pairs, width, data) = tensor::decode(m.contributions.as_ref(), "contributions")?;
        Ok(Contributions { pairs, width, data })
    }
}

impl From<Contributions> for pb::RunExpertsResponse {
    fn from(c: Contributions) -> Self {
        pb::RunExpertsResponse { contributions: Some(tensor::encode(c.pairs, c.width, c.data)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> ExpertBatch {
        ExpertBatch {
            layer: LayerId(3),
            width: 2,
            hidden: vec![1.0, 2.0, 3.0, 4.0],
            routes: vec![vec![(ExpertId(5), 0.5), (ExpertId(1), 0.25)], vec![(ExpertId(7), 1.0)]],
        }
    }

    #[test]
    fn batch_round_trips() {
        let m: pb::RunExpertsRequest = batch().into();
        assert_eq!(ExpertBatch::try_from(m).unwrap(), batch());
    }

    #[test]
    fn inconsistent_requests_are_rejected() {
        let good: pb::RunExpertsRequest = batch().into();
        let mut m = good.clone();
        m.route_counts.pop();
        assert!(ExpertBatch::try_from(m).unwrap_err().0.contains("route counts for 2 tokens"));
        let mut m = good.clone();
        m.weights.pop();
        assert!(ExpertBatch::try_from(m).unwrap_err().0.contains("add up to"));
        let mut m = good.clone();
        m.route_counts[0] = u32::MAX;
        assert!(ExpertBatch::try_from(m).is_err());
        let mut m = good;
        m.weights[0] = f32::NAN;
        assert!(ExpertBatch::try_from(m).unwrap_err().0.contains("not finite"));
    }
}
