//! Matrix products on strided views of plain slices, through the gemm crate that candle's CPU
//! backend uses: the fused kernels read operands in place (a head of q inside [B, L, H], a
//! transposed weight) instead of making the contiguous copies candle's `matmul` would need.

/// A strided matrix inside a slice: element (r, c) at `data[r·row_stride + c·col_stride]`.
#[derive(Clone, Copy)]
pub(super) struct View {
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl View {
    /// A row-major matrix whose rows are `row_stride` apart.
    pub fn rows_of(rows: usize, cols: usize, row_stride: usize) -> Self {
        Self {
            rows,
            cols,
            row_stride,
            col_stride: 1,
        }
    }

    /// The transpose, as a view of the same data.
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// The slice length the view needs.
    fn extent(&self) -> usize {
        (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride + 1
    }
}

/// dst = scale·lhs·rhs (+ dst when `accumulate`), single-threaded: the caller already runs one
/// shard of the batch per thread.
#[allow(clippy::too_many_arguments)] // a GEMM's operands: three views, a scale and a mode
pub(super) fn matmul(
    dst: &mut [f32],
    dv: View,
    lhs: &[f32],
    lv: View,
    rhs: &[f32],
    rv: View,
    scale: f32,
    accumulate: bool,
) {
    assert!(
        lv.cols == rv.rows && dv.rows == lv.rows && dv.cols == rv.cols,
        "matmul shapes"
    );
    assert!(dst.len() >= dv.extent() && lhs.len() >= lv.extent() && rhs.len() >= rv.extent());
    // SAFETY: the three views lie inside their slices (checked above) and dst is borrowed
    // mutably, so it overlaps neither input.
    unsafe {
        gemm::gemm(
            dv.rows,
            dv.cols,
            lv.cols,
            dst.as_mut_ptr(),
            dv.col_stride as isize,
            dv.row_stride as isize,
            accumulate,
            lhs.as_ptr(),
            lv.col_stride as isize,
            lv.row_stride as isize,
            rhs.as_ptr(),
            rv.col_stride as isize,
            rv.row_stride as isize,
            1.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}
