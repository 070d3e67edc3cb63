// Unit disk |a| <= 1 (wpgflow [actions] domain = "disk"; scaled by actions.radius, moved by actions.center).
// Regenerate the XDMF meshes with `make meshes`; h is the target edge length (set by meshes/generate.py).
DefineConstant[ h = {0.1, Name "h"} ];
Point(1) = {0, 0, 0, h};
Point(2) = {1, 0, 0, h};
Point(3) = {0, 1, 0, h};
Point(4) = {-1, 0, 0, h};
Point(5) = {0, -1, 0, h};
Circle(1) = {2, 1, 3};
Circle(2) = {3, 1, 4};
Circle(3) = {4, 1, 5};
Circle(4) = {5, 1, 2};
Curve Loop(1) = {1, 2, 3, 4};
Plane Surface(1) = {1};
Physical Surface(1) = {1};
Mesh.Algorithm = 5;  // Delaunay
