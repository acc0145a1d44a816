//! Optimal one-to-one assignment (the Hungarian method) and IoU matching built on it.

use crate::geometry::BBox;

/// Solves the rectangular assignment problem: picks one distinct column for every row so
/// that the sum of the picked costs is least. Needs `rows <= cols`; `cost` is row-major,
/// `rows * cols` long, with finite entries. Returns the column picked for each row.
///
/// This is the shortest-augmenting-path form with row and column potentials, `O(rows² *
/// cols)`: each row in turn is added and the cheapest alternating path (in reduced costs)
/// to a free column is flipped. Trackers match tens of boxes, far below where that cost
/// matters.
pub fn min_cost_assignment(cost: &[f64], rows: usize, cols: usize) -> Vec<usize> {
    assert!(
        rows <= cols,
        "assignment needs rows <= cols ({rows} > {cols})"
    );
    assert_eq!(cost.len(), rows * cols, "cost matrix has the wrong length");
    if rows == 0 {
        return Vec::new();
    }

    // Index 0 of the column arrays is a virtual column where each new row's path starts;
    // rows are numbered from 1 so that 0 can mean "no row".
    let at = |row: usize, col: usize| cost[(row - 1) * cols + (col - 1)];
    let mut row_pot = vec![0.0; rows + 1];
    let mut col_pot = vec![0.0; cols + 1];
    let mut owner = vec![0usize; cols + 1];
    let mut came_from = vec![0usize; cols + 1];
    let mut best = vec![0.0; cols + 1];
    let mut done = vec![false; cols + 1];

    for row in 1..=rows {
        owner[0] = row;
        let mut col = 0;
        best.fill(f64::INFINITY);
        done.fill(false);

        // Grow a tree of tight edges (Dijkstra on reduced costs) until it reaches a free
        // column, shifting the potentials so that the reduced costs stay non-negative.
        loop {
            done[col] = true;
            let from_row = owner[col];
            let mut step = f64::INFINITY;
            let mut next = 0;
            for j in 1..=cols {
                if done[j] {
                    continue;
                }
                let reduced = at(from_row, j) - row_pot[from_row] - col_pot[j];
                if reduced < best[j] {
                    best[j] = reduced;
                    came_from[j] = col;
                }
                if best[j] < step {
                    step = best[j];
                    next = j;
                }
            }

            for j in 0..=cols {
                if done[j] {
                    row_pot[owner[j]] += step;
                    col_pot[j] -= step;
                } else {
                    best[j] -= step;
                }
            }

            col = next;
            if owner[col] == 0 {
                break;
            }
        }

        // Flip the path back to the virtual column: each column on it changes hands.
        while col != 0 {
            let prev = came_from[col];
            owner[col] = owner[prev];
            col = prev;
        }
    }

    let mut picked = vec![0; rows];
    for (col, &row) in owner.iter().enumerate().skip(1) {
        if row != 0 {
            picked[row - 1] = col - 1;
        }
    }
    picked
}

/// Result of matching predicted track boxes to detected boxes.
#[derive(Debug, Default, PartialEq)]
pub struct Matching {
    /// `(track index, detection index)` pairs.
    pub pairs: Vec<(usize, usize)>,
    pub unmatched_tracks: Vec<usize>,
    pub unmatched_detections: Vec<usize>,
}

/// Matches tracks to detections so that the summed IoU of the matched pairs is greatest,
/// where a pair may only match when its IoU is at least `min_iou` and `allowed(track,
/// detection)` holds (for example, same label).
///
/// Leaving a track unmatched is an explicit choice in the cost matrix (a private zero-cost
/// "miss" column per track), so the solver never pushes a track onto a poor detection just
/// because every row must be assigned.
pub fn match_by_iou(
    tracks: &[BBox],
    detections: &[BBox],
    min_iou: f64,
    allowed: impl Fn(usize, usize) -> bool,
) -> Matching {
    let (n, m) = (tracks.len(), detections.len());
    let cols = m + n;
    // Any cost above the miss cost (0) and the best match (-1) works as "forbidden": a
    // forbidden pair is never worse to take than to leave, so it is never taken.
    const FORBIDDEN: f64 = 1.0;
    let mut cost = vec![FORBIDDEN; n * cols];
    for (t, tb) in tracks.iter().enumerate() {
        for (d, db) in detections.iter().enumerate() {
            let iou = tb.iou(db);
            if iou >= min_iou && iou > 0.0 && allowed(t, d) {
                cost[t * cols + d] = -iou;
            }
        }
        cost[t * cols + m + t] = 0.0;
    }

    let picked = min_cost_assignment(&cost, n, cols);
    let mut out = Matching::default();
    let mut detection_taken = vec![false; m];
    for (t, &col) in picked.iter().enumerate() {
        if col < m && cost[t * cols + col] < 0.0 {
            out.pairs.push((t, col));
            detection_taken[col] = true;
        } else {
            out.unmatched_tracks.push(t);
        }
    }
    out.unmatched_detections = (0..m).filter(|&d| !detection_taken[d]).collect();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small deterministic generator so that the tests need no extra crates.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> f64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    fn brute_force(cost: &[f64], rows: usize, cols: usize) -> f64 {
        fn go(cost: &[f64], rows: usize, cols: usize, row: usize, used: &mut [bool]) -> f64 {
            if row == rows {
                return 0.0;
            }
            let mut best = f64::INFINITY;
            for c in 0..cols {
                if !used[c] {
                    used[c] = true;
                    let v = cost[row * cols + c] + go(cost, rows, cols, row + 1, used);
                    used[c] = false;
                    best = best.min(v);
                }
            }
            best
        }
        go(cost, rows, cols, 0, &mut vec![false; cols])
    }

    #[test]
    fn classic_three_by_three() {
        let cost = [4.0, 1.0, 3.0, 2.0, 0.0, 5.0, 3.0, 2.0, 2.0];
        let picked = min_cost_assignment(&cost, 3, 3);
        let total: f64 = picked
            .iter()
            .enumerate()
            .map(|(r, &c)| cost[r * 3 + c])
            .sum();
        assert_eq!(total, 5.0);
        assert_eq!(picked, vec![1, 0, 2]);
    }

    #[test]
    fn matches_brute_force_on_random_rectangles() {
        let mut rng = Lcg(7);
        for case in 0..300 {
            let rows = 1 + case % 5;
            let cols = rows + (case / 5) % 3;
            let cost: Vec<f64> = (0..rows * cols).map(|_| rng.next() * 10.0 - 3.0).collect();

            let picked = min_cost_assignment(&cost, rows, cols);
            let mut seen = vec![false; cols];
            for &c in &picked {
                assert!(!seen[c], "column {c} picked twice");
                seen[c] = true;
            }
            let total: f64 = picked
                .iter()
                .enumerate()
                .map(|(r, &c)| cost[r * cols + c])
                .sum();
            let best = brute_force(&cost, rows, cols);
            assert!(
                (total - best).abs() < 1e-9,
                "case {case}: {total} vs {best}"
            );
        }
    }

    #[test]
    fn empty_problem() {
        assert!(min_cost_assignment(&[], 0, 3).is_empty());
    }

    fn b(left: f64, top: f64) -> BBox {
        BBox::new(left, top, 0.1, 0.2)
    }

    #[test]
    fn iou_matching_prefers_the_global_best() {
        // Greedy-by-IoU takes the best pair first (track 0 with detection 0, 0.90) and
        // is left with 0.61 for the rest; swapping gives 0.82 + 0.83, the larger sum.
        let tracks = [b(0.0, 0.0), b(0.014, 0.0)];
        let dets = [b(0.005, 0.0), b(-0.01, 0.0)];
        let m = match_by_iou(&tracks, &dets, 0.3, |_, _| true);
        assert_eq!(m.pairs, vec![(0, 1), (1, 0)]);
        assert!(m.unmatched_tracks.is_empty() && m.unmatched_detections.is_empty());
    }

    #[test]
    fn pairs_below_the_threshold_or_disallowed_stay_unmatched() {
        let tracks = [b(0.0, 0.0), b(0.5, 0.5)];
        let dets = [b(0.09, 0.0), b(0.5, 0.5), b(0.9, 0.9)];
        let m = match_by_iou(&tracks, &dets, 0.3, |t, _| t != 1);
        assert!(m.pairs.is_empty());
        assert_eq!(m.unmatched_tracks, vec![0, 1]);
        assert_eq!(m.unmatched_detections, vec![0, 1, 2]);
    }

    #[test]
    fn more_tracks_than_detections() {
        let tracks = [b(0.0, 0.0), b(0.3, 0.3), b(0.6, 0.6)];
        let dets = [b(0.61, 0.6)];
        let m = match_by_iou(&tracks, &dets, 0.3, |_, _| true);
        assert_eq!(m.pairs, vec![(2, 0)]);
        assert_eq!(m.unmatched_tracks, vec![0, 1]);
        assert!(m.unmatched_detections.is_empty());
    }
}
