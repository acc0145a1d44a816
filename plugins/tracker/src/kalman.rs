//! A constant-velocity Kalman filter over a box's centre and size.
//!
//! The state is `(cx, cy, w, h)` and their velocities per frame. Each of the four
//! coordinates moves independently under the constant-velocity model and is measured
//! directly, and the noise covariances are diagonal, so the 8-dimensional filter splits
//! exactly into four 2-state filters (position, velocity). Keeping them apart means plain
//! 2x2 arithmetic instead of 8x8 matrices, with the same result.
//!
//! Noise is proportional to the box's size along the same axis (width for `cx` and `w`,
//! height for `cy` and `h`): a box twice as big moves and jitters twice as much in
//! normalized units. This also makes the filter indifferent to the frame's aspect ratio.

use crate::geometry::BBox;

/// Standard deviation of the initial position and of the per-frame process noise on
/// position, as a fraction of the box's size on that axis.
const POSITION_STD: f64 = 1.0 / 20.0;
/// Standard deviation of the per-frame process noise on velocity, as a fraction of size.
const VELOCITY_STD: f64 = 1.0 / 160.0;
/// How many times more uncertain a new track's velocity is than the process noise: a new
/// track has seen one box, so its velocity is unknown.
const INITIAL_VELOCITY_SCALE: f64 = 10.0;
/// Measurement noise, as a fraction of size. Detectors jitter by a few percent of a box.
const MEASUREMENT_STD: f64 = 1.0 / 20.0;
/// Floor on the size used to scale noise, so that a degenerate box cannot make the filter
/// infinitely confident.
const MIN_SCALE: f64 = 1e-4;

/// One coordinate and its velocity with their 2x2 covariance `[[pp, pv], [pv, vv]]`.
#[derive(Debug, Clone, Copy)]
struct Axis {
    pos: f64,
    vel: f64,
    pp: f64,
    pv: f64,
    vv: f64,
}

impl Axis {
    fn new(pos: f64, scale: f64) -> Self {
        let pos_std = 2.0 * POSITION_STD * scale;
        let vel_std = INITIAL_VELOCITY_SCALE * VELOCITY_STD * scale;
        Self {
            pos,
            vel: 0.0,
            pp: pos_std * pos_std,
            pv: 0.0,
            vv: vel_std * vel_std,
        }
    }

    /// Advances by `dt` frames: `x' = F x`, `P' = F P Fᵀ + Q dt` with `F = [[1, dt], [0, 1]]`.
    fn predict(&mut self, dt: f64, scale: f64) {
        let q_pos = (POSITION_STD * scale).powi(2) * dt;
        let q_vel = (VELOCITY_STD * scale).powi(2) * dt;

        self.pos += self.vel * dt;
        self.pp += 2.0 * dt * self.pv + dt * dt * self.vv + q_pos;
        self.pv += dt * self.vv;
        self.vv += q_vel;
    }

    /// Folds in a direct measurement of the position.
    fn update(&mut self, measured: f64, scale: f64) {
        let r = (MEASUREMENT_STD * scale).powi(2);
        let innovation = measured - self.pos;
        let s = self.pp + r;
        let k_pos = self.pp / s;
        let k_vel = self.pv / s;

        self.pos += k_pos * innovation;
        self.vel += k_vel * innovation;
        // (I - K H) P, written out; the velocity variance uses the old `pv`.
        self.vv -= k_vel * self.pv;
        self.pp *= 1.0 - k_pos;
        self.pv *= 1.0 - k_pos;
    }
}

/// Kalman filter over one tracked box.
#[derive(Debug, Clone)]
pub struct BoxFilter {
    cx: Axis,
    cy: Axis,
    w: Axis,
    h: Axis,
}

impl BoxFilter {
    /// Starts a filter at a detected box, at rest.
    pub fn new(b: &BBox) -> Self {
        let (cx, cy) = b.centre();
        let (sw, sh) = (b.width.max(MIN_SCALE), b.height.max(MIN_SCALE));
        Self {
            cx: Axis::new(cx, sw),
            cy: Axis::new(cy, sh),
            w: Axis::new(b.width, sw),
            h: Axis::new(b.height, sh),
        }
    }

    /// Moves the state `dt` frames forward (usually 1; more when frames were skipped).
    pub fn predict(&mut self, dt: f64) {
        let (sw, sh) = self.scales();
        self.cx.predict(dt, sw);
        self.cy.predict(dt, sh);
        self.w.predict(dt, sw);
        self.h.predict(dt, sh);

        // A shrinking box must not turn inside out while coasting: stop the shrink instead.
        for axis in [&mut self.w, &mut self.h] {
            if axis.pos < MIN_SCALE {
                axis.pos = MIN_SCALE;
                axis.vel = 0.0;
            }
        }
    }

    /// Corrects the state with a detected box.
    pub fn update(&mut self, b: &BBox) {
        let (sw, sh) = self.scales();
        let (cx, cy) = b.centre();
        self.cx.update(cx, sw);
        self.cy.update(cy, sh);
        self.w.update(b.width, sw);
        self.h.update(b.height, sh);
    }

    /// The current estimate of the box.
    pub fn bbox(&self) -> BBox {
        BBox::from_centre(
            self.cx.pos,
            self.cy.pos,
            self.w.pos.max(MIN_SCALE),
            self.h.pos.max(MIN_SCALE),
        )
    }

    /// The estimated velocity of the centre, in normalized units per frame.
    pub fn velocity(&self) -> (f64, f64) {
        (self.cx.vel, self.cy.vel)
    }

    fn scales(&self) -> (f64, f64) {
        (self.w.pos.max(MIN_SCALE), self.h.pos.max(MIN_SCALE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn new_filter_reports_the_detection() {
        let b = BBox::new(0.1, 0.2, 0.05, 0.2);
        let f = BoxFilter::new(&b);
        let got = f.bbox();
        assert!(close(got.left, b.left, 1e-12) && close(got.top, b.top, 1e-12));
        assert!(close(got.width, b.width, 1e-12) && close(got.height, b.height, 1e-12));
        assert_eq!(f.velocity(), (0.0, 0.0));
    }

    #[test]
    fn learns_a_constant_velocity_and_predicts_ahead() {
        let mut b = BBox::new(0.1, 0.3, 0.05, 0.2);
        let mut f = BoxFilter::new(&b);
        for _ in 0..30 {
            b.left += 0.01;
            b.top -= 0.002;
            f.predict(1.0);
            f.update(&b);
        }

        let (vx, vy) = f.velocity();
        assert!(close(vx, 0.01, 1e-3), "vx = {vx}");
        assert!(close(vy, -0.002, 1e-3), "vy = {vy}");

        // Coast three frames without measurements: the box keeps moving.
        f.predict(3.0);
        let p = f.bbox();
        assert!(close(p.left, b.left + 0.03, 3e-3), "left = {}", p.left);
        assert!(close(p.top, b.top - 0.006, 3e-3), "top = {}", p.top);
    }

    #[test]
    fn one_step_of_dt_two_matches_two_steps_of_one_in_the_mean() {
        let b = BBox::new(0.4, 0.4, 0.1, 0.1);
        let mut f = BoxFilter::new(&b);
        f.predict(1.0);
        f.update(&BBox::new(0.42, 0.4, 0.1, 0.1));
        let (mut one, mut two) = (f.clone(), f);
        one.predict(2.0);
        two.predict(1.0);
        two.predict(1.0);
        assert!(close(one.bbox().left, two.bbox().left, 1e-12));
    }

    #[test]
    fn measurement_pulls_the_estimate_towards_it() {
        let mut f = BoxFilter::new(&BBox::new(0.5, 0.5, 0.1, 0.1));
        f.predict(1.0);
        f.update(&BBox::new(0.6, 0.5, 0.1, 0.1));
        let left = f.bbox().left;
        assert!(left > 0.5 && left < 0.6, "left = {left}");
    }

    #[test]
    fn a_shrinking_box_never_turns_inside_out() {
        let mut f = BoxFilter::new(&BBox::new(0.5, 0.5, 0.1, 0.1));
        for w in [0.08, 0.06, 0.04, 0.02] {
            f.predict(1.0);
            f.update(&BBox::new(0.5, 0.5, w, w));
        }
        f.predict(50.0);
        let b = f.bbox();
        assert!(b.width > 0.0 && b.height > 0.0);
    }
}
