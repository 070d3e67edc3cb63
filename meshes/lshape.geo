// L-shape [-1, 1]^2 minus the quadrant (0, 1]^2, area 3 (wpgflow [actions] domain = "lshape"; scaled by
// actions.scale, moved by actions.center). The re-entrant corner is at the origin.
// Regenerate the XDMF meshes with `make meshes`; h is the target edge length (set by meshes/generate.py).
DefineConstant[ h = {0.1, Name "h"} ];
Point(1) = {-1, -1, 0, h};
Point(2) = {1, -1, 0, h};
Point(3) = {1, 0, 0, h};
Point(4) = {0, 0, 0, h};
Point(5) = {0, 1, 0, h};
Point(6) = {-1, 1, 0, h};
Line(1) = {1, 2};
Line(2) = {2, 3};
Line(3) = {3, 4};
Line(4) = {4, 5};
Line(5) = {5, 6};
Line(6) = {6, 1};
Curve Loop(1) = {1, 2, 3, 4, 5, 6};
Plane Surface(1) = {1};
Physical Surface(1) = {1};
Mesh.Algorithm = 5;  // Delaunay
