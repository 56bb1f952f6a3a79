//! vLLM's `thinking_token_budget`: a thinking answer may reason for at
//! most so many tokens. Once that many were sampled before `</think>`,
//! `</think>` is the only token allowed, so the answer goes on past its
//! reasoning. A constraint of its own, around the request's grammar if it
//! has one.

use crate::engine::Constraint;

pub struct ThinkingBudget {
    /// Reasoning tokens still allowed.
    left: usize,
    think_end: u32,
    /// `</think>` has been sampled: the budget no longer applies.
    ended: bool,
    /// The mask allowing `</think>` alone.
    only_end: Vec<u32>,
    /// The request's grammar, if any.
    inner: Option<Box<dyn Constraint>>,
}

impl ThinkingBudget {
    /// `budget` reasoning tokens over a vocabulary of `vocab` ids whose
    /// `</think>` is `think_end`, around `inner`.
    pub fn new(budget: usize, think_end: u32, vocab: usize, inner: Option<Box<dyn Constraint>>) -> Self {
        let mut only_end = vec![0u32; vocab.max(think_end as usize + 1).div_ceil(32)];
        only_end[think_end as usize / 32] = 1 << (think_end % 32);
        ThinkingBudget { left: budget, think_end, ended: false, only_end, inner }
    }
}

impl Constraint for ThinkingBudget {
    fn allowed(&mut self) -> Result<Option<Vec<u32>>, String> {
        if !self.ended && self.left == 0 {
            return Ok(Some(self.only_end.clone()));
        }
        self.inner.as_mut().map_or(Ok(None), |c| c.allowed())
    }

    fn consume(&mut self, token: u32) -> Result<(), String> {
        if token == self.think_end {
            self.ended = true;
        } else if !self.ended {
            self.left = self.left.saturating_sub(1);
        }
        self.inner.as_mut().map_or(Ok(()), |c| c.consume(token))
    }

    fn finished(&self) -> bool {
        self.inner.as_ref().is_some_and(|c| c.finished())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::mask_allows;

    #[test]
    fn the_end_of_thinking_is_forced_once_the_budget_is_spent() {
        let mut budget = ThinkingBudget::new(2, 40, 100, None);
        for t in [7, 8] {
            assert_eq!(budget.allowed(), Ok(None), "within the budget every token may follow");
            budget.consume(t).unwrap();
        }
        let only = budget.allowed().unwrap().unwrap();
        assert!((0..100).all(|t| mask_allows(&only, t) == (t == 40)));
        budget.consume(40).unwrap();
        // Past `</think>` the answer is free again, however long.
        for t in [1, 2, 3] {
            assert_eq!(budget.allowed(), Ok(None));
            budget.consume(t).unwrap();
        }
        assert!(!budget.finished());
        // A budget of 0: no reasoning at all.
        let mut none = ThinkingBudget::new(0, 3, 64, None);
        assert!(mask_allows(&none.allowed().unwrap().unwrap(), 3));
        // Ending early leaves the budget unused.
        let mut early = ThinkingBudget::new(5, 3, 64, None);
        early.consume(3).unwrap();
        assert_eq!(early.allowed(), Ok(None));
    }
}
